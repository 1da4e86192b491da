"""blendserve-sgl: BlendServe scheduling (resource-aware prefix tree + dual scanner) for SGLang offline batches."""

__version__ = "0.1.0"
