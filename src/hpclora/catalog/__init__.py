"""What is known without downloading anything: architectures and model dimensions, GPU types, precision rules,
the Hugging Face cache as a run sees it, this node's facts, the per-user state directory. Light: no torch."""
