"""Adapter methods: each builds the op's ``(D, s, U)`` and its frozen base from ``W0``.

``METHODS`` maps a method name to its class (the README's "Methods" table gives each one's
``D``, ``s``, ``U``). A method is one module: an :class:`AdapterMethod` subclass that
declares its options (:class:`Option`); :func:`register_method` adds it, and from then on
``AdapterLinear.from_linear``, ``inject``, the adapter files and the demo know it.
"""
from .base import AdapterMethod
from .lora import LoRA
from .options import ALPHA, OFFSET, RANK, SVD, Option, OptionContext, check_rank, rank_check
from .pica import PiCa
from .speclora import SpecLoRA, spectral_scale
from .spectral import SpectralAdditive, SpectralRotational, cayley
from .svd import top_singular

METHODS: dict[str, type[AdapterMethod]] = {}
# Names an option must not take: from_linear's own arguments and the keys of a layer's
# entry in the adapter files.
RESERVED_OPTION_NAMES = frozenset({
    "linear", "method", "dropout", "adapter_dtype", "generator", "quantize", "blocksize",
    "double_quant", "rank", "in_features", "out_features", "bias", "base_dtype", "base_quant",
    "share_with", "source", "base_fingerprint", "format", "format_version", "library_version",
    "tensors", "layers"})


def register_method(cls: type[AdapterMethod]) -> type[AdapterMethod]:
    """Add ``cls`` to :data:`METHODS` under ``cls.name``; returns ``cls`` (so it works as a
    class decorator). Raises ``TypeError``/``ValueError`` for a class that is not an
    :class:`AdapterMethod`, a name already registered, or bad option declarations."""
    if not (isinstance(cls, type) and issubclass(cls, AdapterMethod)):
        raise TypeError(f"cls must be an AdapterMethod subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{cls.__name__}.name must be an identifier string, got {name!r}")
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered ({METHODS[name].__name__})")
    options = cls.options
    if not isinstance(options, tuple) or not all(isinstance(o, Option) for o in options):
        raise TypeError(f"{cls.__name__}.options must be a tuple of Option, got {options!r}")
    names = [o.name for o in options]
    bad = sorted({n for n in names if not n.isidentifier() or n in RESERVED_OPTION_NAMES}
                 | {n for n in names if names.count(n) > 1})
    if bad:
        raise ValueError(f"{cls.__name__}.options: names {bad} are duplicated, not "
                         f"identifiers or reserved ({sorted(RESERVED_OPTION_NAMES)})")
    METHODS[name] = cls
    return cls


def unregister_method(name: str) -> type[AdapterMethod]:
    """Remove the method registered as ``name`` (e.g. one a test added); returns its class."""
    if name not in METHODS:
        raise ValueError(f"method {name!r} is not registered (registered: {sorted(METHODS)})")
    return METHODS.pop(name)


def get_method(name: str) -> type[AdapterMethod]:
    """The method class registered as ``name``."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]


for _cls in (LoRA, SpecLoRA, SpectralAdditive, SpectralRotational, PiCa):
    register_method(_cls)
del _cls

__all__ = ["METHODS", "AdapterMethod", "LoRA", "SpecLoRA", "SpectralAdditive",
           "SpectralRotational", "PiCa", "cayley", "spectral_scale", "top_singular",
           "get_method", "register_method", "unregister_method", "Option", "OptionContext",
           "RANK", "ALPHA", "OFFSET", "SVD", "check_rank", "rank_check", "RESERVED_OPTION_NAMES"]
