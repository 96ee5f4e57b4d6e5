"""Stop requests inside training: one of the stop signals (stops.py) asks it to checkpoint at the next step
boundary and exit with CHECKPOINTED_EXIT, which the job script answers with `scontrol requeue`; the requeued job
runs the very same command and resumes from that checkpoint.
"""

from __future__ import annotations

import signal
from pathlib import Path

from ..stops import CANCELLED
from ..stops import STOP_SIGNALS as STOP_SIGNAL_NAMES

STOP_SIGNALS = tuple(signal.Signals[f"SIG{name}"] for name in STOP_SIGNAL_NAMES)


class StopRequest:
    """While active, the stop signals only set `signal_name`; the training loop looks at it each step. Ctrl-C
    (SIGINT) is one too, the first time; a Ctrl-C after a stop was asked for stops at once (KeyboardInterrupt), losing
    the steps since the newest checkpoint, which the training then names."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict = {}
        self._request: tuple[Path, str] | None = None

    def __enter__(self) -> "StopRequest":
        for sig in (*STOP_SIGNALS, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        # The name first: a call between the test and the assignment would let a second signal's handler run in
        # between (the job script passes a stop on more than once), and both would print.
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            again = "; Ctrl-C again stops at once, losing the steps since the last checkpoint" if name == "Ctrl-C" else ""
            print(f"{self.signal_name} received: checkpointing at the next step boundary{again}", flush=True)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C after a stop was asked for: at once

    def watch(self, request: Path, job: str | None) -> None:
        """Stop also when `request` (written by `hpclora cancel`) names this job. One naming another job (an
        earlier one in this run directory, cancelled before it trained) is removed: it asks nothing of this one."""
        if job is None:
            return
        if request.is_file() and request.read_text(encoding="utf-8").strip() != job:
            request.unlink(missing_ok=True)
        self._request = (request, job)

    @property
    def cancelled(self) -> bool:
        return self.signal_name == CANCELLED

    @property
    def requested(self) -> bool:
        if self.signal_name is None and self._request is not None and self._request[0].is_file():
            self.signal_name = CANCELLED
            print("`hpclora cancel` asked for a stop: checkpointing at the next step boundary", flush=True)
        return self.signal_name is not None
