"""Drop-in layers built on the fused adapter op."""
from .linear import AdapterLinear

__all__ = ["AdapterLinear"]
