"""NF4 (bitsandbytes layout) weights: wrapping, quantization and exact dequantization.

The Triton device functions live in :mod:`speclora_kernels.quant.triton_nf4` (imported by
the kernels, not here, so this package needs neither Triton nor bitsandbytes).
"""
from .nf4 import (
    BLOCKSIZES,
    NF4_VALUES,
    NF4Weight,
    decode_dtype,
    dequantize_nf4,
    dynamic_code,
    nf4_code,
    quantize_residual,
)
from .nf4_tensor import NF4Tensor, local_nf4

__all__ = [
    "BLOCKSIZES",
    "NF4_VALUES",
    "NF4Tensor",
    "NF4Weight",
    "decode_dtype",
    "dequantize_nf4",
    "dynamic_code",
    "local_nf4",
    "nf4_code",
    "quantize_residual",
]
