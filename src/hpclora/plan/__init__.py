"""The planner, on the login node and without torch: will a run fit, with which precision, micro-batch,
strategy and time (make.py, from memory.py, speed.py, strategy.py and steps.py); the checks before anything is
queued (preflight.py: the model's context and every data row; gate.py: the plan's refusals and `auto` choices);
and what probe jobs measured on this cluster (calibration.py)."""

from .format import fit_advice, format_plan
from .gate import check_before_submit
from .make import Plan, make_plan

__all__ = ["Plan", "check_before_submit", "fit_advice", "format_plan", "make_plan"]
