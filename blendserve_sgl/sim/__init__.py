"""A trace-driven simulator of SGLang-style offline batch inference that drives the project's
own scheduling objects (`ResourceTree`, `DualScanner`); plain Python/NumPy."""

from .engine import Engine, EngineConfig
from .metrics import SimResult
from .policies import POLICIES, make_picker
from .run import RunSpec, Workload, simulate
from .timing import ExecModel

__all__ = ["Engine", "EngineConfig", "ExecModel", "POLICIES", "RunSpec", "SimResult", "Workload", "make_picker",
           "simulate"]
