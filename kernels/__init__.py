"""Attention kernels and CPU fallbacks used by the SGLang side of blendserve-sgl."""
