"""The public op. Placeholder until the fused kernels land: dispatches to the reference."""
from ..reference import fused_adapter_linear as _reference


def fused_adapter_linear(x, weight, bias, down, scale, up, dropout_p=0.0, dropout_rows=None,
                         grad_rows=None, training=True):
    return _reference(x, weight, bias, down, scale, up, dropout_p, dropout_rows, grad_rows,
                      training=training)


__all__ = ["fused_adapter_linear"]
