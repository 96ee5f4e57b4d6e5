"""Inside the job: the training entrypoint and everything it runs (model, loss, kernels, Trainer, checkpoints,
distributed ranks, stop signals). The only stage that imports torch, transformers and peft at module level."""
