"""hpclora: LoRA and QLoRA fine-tuning as batch jobs on HPC clusters, and in-process on CPU.

The command line is `hpclora`; the library surface is below (see hpclora.api for an example). Importing
it does not import torch.
"""

from .api import Submission, TrainingJob, executor_parameters, load_config, plan_run, prepare_run, read_summary, submit, sweep
from .config import RunConfig
from .errors import ConfigError, DataError, UserError
from .plan import Plan

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "Plan", "RunConfig", "Submission", "TrainingJob", "UserError", "executor_parameters",
           "load_config", "plan_run", "prepare_run", "read_summary", "submit", "sweep"]
