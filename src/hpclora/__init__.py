"""hpclora: LoRA and QLoRA fine-tuning as batch jobs on HPC clusters, and in-process on CPU."""

__version__ = "0.1.0"
