"""Fused Triton kernels for spectral and low-rank adapter layers.

One op serves every method: ``y = x @ W.T + bias + ((x @ D.T) * s) @ U.T``.
"""
from .reference import fused_adapter_linear as reference_adapter_linear

__version__ = "0.1.0"

__all__ = ["reference_adapter_linear", "__version__"]
