"""Tools that measure kernels without a GPU: interpreter counters, floors, predictions."""
