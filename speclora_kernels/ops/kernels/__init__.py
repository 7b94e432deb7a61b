"""The ``@triton.jit`` kernels of the op; launched only through ``ops.tuning``."""
