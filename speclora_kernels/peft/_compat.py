"""Which PEFT this subpackage works with, checked once on import.

We extend PEFT through its extension points: ``peft.utils.register_peft_method`` (0.15+)
and the mappings it fills (``peft.mapping.PEFT_TYPE_TO_*``), ``BaseTuner`` /
``BaseTunerLayer`` and their state-dict hooks (``_get_adapter_state_dict``,
``_remap_adapter_state_dict_for_load``), and, for :func:`~speclora_kernels.patch_peft`, the
forward of PEFT's LoRA ``Linear`` / bitsandbytes ``Linear4bit`` layers. Most of that is
internal API; it is tested against PEFT 0.21, the oldest version supported. An older or
changed PEFT fails here with an ``ImportError`` naming its version and what is missing,
instead of somewhere deep inside a training run.
"""
from __future__ import annotations

import importlib
import re

MIN_PEFT = (0, 21)
# (module, attribute) pairs this subpackage relies on.
REQUIRED = (
    ("peft.utils", "register_peft_method"),
    ("peft.utils.peft_types", "PeftType"),
    ("peft.mapping", "PEFT_TYPE_TO_CONFIG_MAPPING"),
    ("peft.mapping", "PEFT_TYPE_TO_TUNER_MAPPING"),
    ("peft.mapping", "PEFT_TYPE_TO_PREFIX_MAPPING"),
    ("peft.config", "PeftConfig"),
    ("peft.tuners.tuners_utils", "BaseTuner"),
    ("peft.tuners.tuners_utils", "BaseTunerLayer"),
    ("peft.tuners.tuners_utils", "check_adapters_to_merge"),
    ("peft.tuners.tuners_utils.BaseTuner", "_get_adapter_state_dict"),
    ("peft.tuners.tuners_utils.BaseTuner", "_remap_adapter_state_dict_for_load"),
    ("peft.tuners.lora.layer", "Linear"),
    ("peft.utils.constants", "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"),
)


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.21.2"`` -> ``(0, 21, 2)``; pre-release and local parts are ignored."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def missing_extension_points(required=REQUIRED) -> list[str]:
    """The ``module.attribute`` names of ``required`` that the installed PEFT lacks."""
    missing = []
    for module_name, attr in required:
        owner_name, _, cls_name = module_name.rpartition(".")
        try:
            if cls_name[:1].isupper():  # an attribute of a class: import its module
                owner = getattr(importlib.import_module(owner_name), cls_name)
            else:
                owner = importlib.import_module(module_name)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{attr}")
            continue
        if not hasattr(owner, attr):
            missing.append(f"{module_name}.{attr}")
    return missing


def require_peft(version: str | None = None, missing: list[str] | None = None) -> str:
    """Return the installed PEFT's version; raise ``ImportError`` naming it when PEFT is
    missing, older than :data:`MIN_PEFT` or lacks one of :data:`REQUIRED`. ``version``
    and ``missing`` override what is detected (for tests)."""
    want = ".".join(map(str, MIN_PEFT))
    if version is None:
        try:
            import peft
        except ImportError as err:
            raise ImportError(f"speclora_kernels.peft needs peft >= {want} (pip install "
                              f"'speclora_kernels[peft]'); peft is not installed: {err}") from err
        version = peft.__version__
    if parse_version(version) < MIN_PEFT:
        raise ImportError(f"speclora_kernels.peft needs peft >= {want}; the installed peft is "
                          f"{version}")
    missing = missing_extension_points() if missing is None else missing
    if missing:
        raise ImportError(f"speclora_kernels.peft needs PEFT's extension points "
                          f"{', '.join(missing)}, which the installed peft {version} lacks "
                          f"(tested with peft {want}); please report this with your peft version")
    return version
