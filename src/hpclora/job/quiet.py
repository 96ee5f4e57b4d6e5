"""Keep job logs to what matters. Call before importing torch/transformers/peft: some of the noise is
printed at import time."""

from __future__ import annotations

import logging
import sys
import warnings


def quiet_libraries() -> None:
    """No library progress bars off a terminal, and no warnings a user cannot act on."""
    # bitsandbytes tries to fetch an optional CPU kernel from the hub when it is imported, and warns.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft calls a transformers API that transformers deprecates.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    import datasets
    import transformers

    transformers.logging.set_verbosity_warning()
    # Loading weights is said by our own lines (results.generate.note, the job log): its bar would be carriage returns.
    transformers.logging.disable_progress_bar()
    if not sys.stdout.isatty():
        datasets.disable_progress_bars()
