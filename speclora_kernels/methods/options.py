"""Method options, declared once.

Each :class:`~speclora_kernels.methods.base.AdapterMethod` lists the options it takes as
``options = (...)`` of :class:`Option`; everything else reads that declaration:
``AdapterLinear.from_linear`` and ``inject`` accept exactly those keyword arguments, the
adapter files save and check the saved ones, and the demo builds its per-method options
from them.

An option's ``check(value, context)`` returns the normalised value or raises
``TypeError``/``ValueError`` naming the option and what was expected; the
:class:`OptionContext` gives the weight's shape (``r`` must fit ``min(out, in)``), the
adapter's dtype and device and the options declared before it. Passing ``None`` means
"not given": the option's ``default`` (a value, or a function of the context) is used.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .svd import SVD_SOLVERS

ALPHA_LIMIT = 1e30  # alpha / r must stay far inside float32's range


@dataclass(frozen=True)
class OptionContext:
    """What an option's check and default may depend on."""

    out_features: int
    in_features: int
    dtype: torch.dtype = torch.float32  # the adapter's parameter dtype
    device: torch.device = torch.device("meta")
    values: Mapping[str, Any] = field(default_factory=dict)  # options declared earlier

    @property
    def max_rank(self) -> int:
        return min(self.out_features, self.in_features)


@dataclass(frozen=True)
class Option:
    """One keyword option of a method.

    Args:
        name: the keyword (and the attribute of the method, for saved options).
        check: ``check(value, context) -> value``: normalises or raises ``TypeError`` /
            ``ValueError`` naming the option and what was expected.
        default: the value when the option is not given (or ``None``): a value, or a
            function of the :class:`OptionContext` (e.g. ``alpha`` defaults to ``r``).
        saved: written to adapter files and :meth:`AdapterMethod.config`, and set as an
            attribute of the method. Runtime-only options (PiCa's ``shared``) are not.
        must_match: for saved options: a file loads only into a layer with the same value
            (it fixes the shapes or the meaning of the saved tensors). False for options
            that only choose how the initial state is computed (``svd``), which a file
            without the key may omit (its default is then used).
        in_every_file: for options that must match: False for an option added after files
            were written without it (``offset``): a file lacking the key means the
            default, which a layer's value must then match.
        help: one line, for documentation.
    """

    name: str
    check: Callable[[Any, OptionContext], Any]
    default: Any = None
    saved: bool = True
    must_match: bool = True
    in_every_file: bool = True
    help: str = ""

    def default_for(self, context: OptionContext):
        return self.default(context) if callable(self.default) else self.default

    def resolve(self, value, context: OptionContext):
        """``value`` checked, or the default checked if ``value`` is None."""
        return self.check(self.default_for(context) if value is None else value, context)


# ---------------------------------------------------------------- checks
def check_rank(name: str, value, limit: int) -> int:
    """``value`` as an int in ``[1, limit]``; ``limit`` is ``min(out, in)``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= value <= limit:
        raise ValueError(f"{name} must be in [1, min(out_features, in_features)={limit}], "
                         f"got {value}")
    return value


def rank_check(name: str) -> Callable[[Any, OptionContext], int]:
    """The check of a rank-like option: an int in ``[1, min(out_features, in_features)]``."""
    return lambda value, context: check_rank(name, value, context.max_rank)


def check_alpha(alpha, context: OptionContext | None = None) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not alpha < ALPHA_LIMIT:
        raise ValueError(f"alpha must be < {ALPHA_LIMIT:g}, got {alpha}")
    return float(alpha)


def check_offset(offset, context: OptionContext) -> int:
    """The first singular index a spectral slice tunes: ``offset + r <= min(out, in)``."""
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    r = context.values["r"]
    if offset < 0 or offset + r > context.max_rank:
        raise ValueError(f"offset must be >= 0 with offset + r <= min(out_features, "
                         f"in_features)={context.max_rank}, got offset={offset}, r={r}")
    return offset


def check_svd(svd, context: OptionContext | None = None) -> str:
    if not isinstance(svd, str) or svd not in SVD_SOLVERS:
        raise ValueError(f"svd must be one of {SVD_SOLVERS}, got {svd!r}")
    return svd


# ---------------------------------------------------------------- shared declarations
RANK = Option("r", rank_check("r"), default=8,
              help="rank: LoRA rank, or the number of top singular directions adapted")
ALPHA = Option("alpha", check_alpha, default=lambda context: context.values["r"],
               help="LoRA scaling numerator: the LoRA rows are scaled by alpha / r "
                    "(default r)")
OFFSET = Option("offset", check_offset, default=0, in_every_file=False,
                help="first singular index tuned: the slice offset..offset+r-1 of W0's "
                     "singular triplets (spectral methods; default 0, the top r)")
SVD = Option("svd", check_svd, default="auto", must_match=False,
             help="SVD solver for the frozen factors: 'auto', 'full' or 'randomized' "
                  "(see methods/svd.py)")
