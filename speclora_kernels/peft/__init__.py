"""speclora_kernels inside PEFT.

- Our methods as PEFT methods: ``SpecLoraConfig``, ``SpectralAdapterConfig`` and
  ``PiCaConfig`` go wherever a ``LoraConfig`` goes (``get_peft_model``, ``save_pretrained``,
  ``PeftModel.from_pretrained``, ``add_adapter`` / ``set_adapter``, ``merge_and_unload``,
  ``Trainer``), their layers running the fused op::

      import speclora_kernels.peft
      model = peft.get_peft_model(model, speclora_kernels.peft.SpecLoraConfig(
          r=8, k=16, target_modules=["q_proj", "v_proj"]))

  Importing this package registers the three types with PEFT (``tuner.register``);
  ``import speclora_kernels`` does it too as soon as peft is imported, before or after it
  (``speclora_kernels._import_hook``), so ``PeftModel.from_pretrained`` of a saved adapter
  needs only ``import speclora_kernels``.
- PEFT's own LoRA on our kernels: :func:`patch_peft` / :func:`unpatch_peft`
  (``speclora_kernels.patch_peft()`` is the same function).
- :func:`bench.timing_pair`: patched vs unpatched PEFT LoRA, one layer, one shape.

Needs peft >= 0.21 (``_compat``); ``speclora_kernels`` itself never imports peft.
"""
from ._compat import require_peft

PEFT_VERSION = require_peft()

from .config import PiCaConfig, SpecLoraConfig, SpectralAdapterConfig  # noqa: E402
from .layer import MethodLayer  # noqa: E402
from .patch import is_patched, patch_peft, unpatch_peft  # noqa: E402
from .tuner import (  # noqa: E402
                    PiCaLayer,
                    PiCaModel,
                    SpecLoraLayer,
                    SpecLoraModel,
                    SpectralAdapterLayer,
                    SpectralAdapterModel,
                    register,
)

register()

__all__ = ["SpecLoraConfig", "SpectralAdapterConfig", "PiCaConfig", "SpecLoraModel",
           "SpectralAdapterModel", "PiCaModel", "SpecLoraLayer", "SpectralAdapterLayer",
           "PiCaLayer", "MethodLayer", "patch_peft", "unpatch_peft", "is_patched", "register",
           "PEFT_VERSION"]
