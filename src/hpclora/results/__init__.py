"""What a finished run gives: answers (generate, chat), held-out evaluation, the merged model, reports."""
