"""`hpclora train CONFIG`: what a job runs (and a person, locally), from the command line to the exit code."""

from __future__ import annotations

from ..errors import UserError
from ..stops import CHECKPOINTED_EXIT


def train_command(config_path: str, overrides: list[str], run_dir: str | None, fresh: bool, own_process: bool = False) -> int:
    """Check what can be checked in a second, then train; 0 when finished, CHECKPOINTED_EXIT when a stop signal made
    it checkpoint first (several ranks end with 0 instead: rank 0 left the stop marker the job script reads).
    `own_process`: this process exists for this one run (the `hpclora` program, as every job runs it)."""
    from .. import config
    from ..catalog import hub
    from ..internals import without_bitsandbytes
    from ..plan import preflight
    from .preempt import StopRequest
    from .quiet import quiet_libraries

    if run_dir is not None and not run_dir.strip():
        raise UserError("--run-dir is empty: give a directory, or leave --run-dir out for a new one under run.output_root")
    with StopRequest() as stop:  # listen for Slurm's stop signals before the slow imports
        cfg = config.load(config_path, overrides)
        hub.use_cache(cfg)  # before check_model asks the cache: the hub libraries read HF_HOME once
        preflight.check_model(cfg)
        hub.require_staged(cfg, config_path)  # offline and not staged: say so now, not after loading
        if own_process and not needs_bitsandbytes(cfg):
            without_bitsandbytes()
        quiet_libraries()  # before train.py pulls in transformers (and with it bitsandbytes)
        from .distributed import world
        from .train import train

        run = train(cfg, run_dir=run_dir, fresh=fresh, stop=stop)
    if run.finished:
        return 0
    # Under torchrun an exit code 75 reads as a failed rank (a traceback in the log): the ranks end with 0.
    return 0 if world().size > 1 else CHECKPOINTED_EXIT


def needs_bitsandbytes(cfg) -> bool:
    """Whether the run quantizes (quant.bits, or a checkpoint saved quantized, such as the hub's `-bnb-4bit` models),
    steps a bitsandbytes optimizer, or loads a model whose config.json is not here to tell (downloaded by the job)."""
    from ..catalog.dims import model_config_file, read_model_config
    from ..catalog.models import BUNDLED
    from ..catalog.precision import BITSANDBYTES_OPTIMIZERS

    if cfg.quant.bits is not None or cfg.train.optimizer in BITSANDBYTES_OPTIMIZERS:
        return True
    if cfg.model.name in BUNDLED:  # converted without its quantization (job/bundled.py)
        return False
    path = model_config_file(cfg)
    return path is None or "quantization_config" in read_model_config(path)
