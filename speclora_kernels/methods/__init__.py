"""Adapter methods: each builds the op's ``(D, s, U)`` and its frozen base from ``W0``.

``METHODS`` maps a method name to its class; see DESIGN.md §1 for the table.
"""
from .base import AdapterMethod
from .lora import LoRA
from .pica import PiCa
from .spectral import SpectralAdditive, SpectralRotational, cayley
from .speclora import SpecLoRA, spectral_scale
from .svd import top_singular

METHODS: dict[str, type[AdapterMethod]] = {
    cls.name: cls for cls in (LoRA, SpecLoRA, SpectralAdditive, SpectralRotational, PiCa)
}


def get_method(name: str) -> type[AdapterMethod]:
    """The method class registered as ``name``."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]


__all__ = ["METHODS", "AdapterMethod", "LoRA", "SpecLoRA", "SpectralAdditive",
           "SpectralRotational", "PiCa", "cayley", "spectral_scale", "top_singular",
           "get_method"]
