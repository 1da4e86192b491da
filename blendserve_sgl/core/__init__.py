"""The scheduling core: plain Python/NumPy, importable without sglang, torch or a GPU."""

from .cost import CostModel, compute_tokens, memory_units, split_memory
from .estimate import OutputLengthEstimator
from .scanner import Admission, Budget, DualScanner, ScanConfig
from .specs import HardwareSpec, ModelSpec, hardware, model
from .split import SplitReport, sort_and_split
from .tree import Group, ResourceTree

__all__ = [
    "Admission", "Budget", "CostModel", "DualScanner", "Group", "HardwareSpec", "ModelSpec",
    "OutputLengthEstimator", "ResourceTree", "ScanConfig", "SplitReport", "compute_tokens", "hardware",
    "memory_units", "model", "sort_and_split", "split_memory",
]
