"""The PEFT tuners of our methods and their registration with PEFT.

One ``BaseTuner`` per PEFT type (``SpecLoraModel``, ``SpectralAdapterModel``,
``PiCaModel``): it resolves each target's method and options from the config
(:func:`~speclora_kernels.persistence.peft_methods.layer_settings`), wraps the target in the
type's :class:`~speclora_kernels.peft.layer.MethodLayer`, and everything else (several named
adapters, ``set_adapter``, ``disable_adapter()``, ``merge_and_unload``, ``save_pretrained``,
``from_pretrained``, ``modules_to_save``) is PEFT's own machinery.

PiCa: the layers of one target name (:func:`~speclora_kernels.integrations.inject.share_key`)
hold one ``M`` parameter; the state dict stores it once, under the group's first layer, and
loading gives it back to every layer of the group (``_get_adapter_state_dict``,
``_remap_adapter_state_dict_for_load``, PEFT's per-method state-dict hooks).

Registration: ``peft.utils.register_peft_method`` registers only names of PEFT's
``PeftType`` enum, which ours are not. ``PeftType`` is a ``str`` enum, so PEFT's mappings
(``peft.mapping.PEFT_TYPE_TO_*``) look plain string keys up alike; :func:`register` writes
ours there with the checks ``register_peft_method`` makes (a unique type and prefix), and
uses ``register_peft_method`` itself should a PEFT version know the name.
"""
from __future__ import annotations

from dataclasses import replace

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from ..integrations.inject import share_key
from ..methods.combine import COMBINATIONS, CombineError, check_weights, combine_adapters
from ..persistence.peft_methods import CONFIG_FIELDS, PEFT_METHODS, layer_settings, peft_layout
from .config import CONFIGS, PICA, SPECLORA, SPECTRAL
from .layer import MethodLayer, layer_class, loading, mixed_batch_hooks


class _Tuner(BaseTuner):
    peft_type: str
    tuner_layer_cls: type[MethodLayer]
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    _enable_peft_forward_hooks = mixed_batch_hooks  # PEFT's adapter_names= (mixed batches)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent,
                            current_key, *, parameter_name=None, **kwargs) -> None:
        if parameter_name is not None:
            raise ValueError(f"{type(peft_config).__name__} adapts linear modules; "
                             f"target_parameters ({parameter_name!r}) is not supported")
        groups, group, shared = None, None, None
        try:
            method, options, dropout = layer_settings(peft_config, current_key)
            if method == "pica":
                groups = self.__dict__.setdefault("_pica_groups", {}).setdefault(adapter_name, {})
                group = share_key(current_key)
                shared = groups.get(group)
            if isinstance(target, self.tuner_layer_cls):
                target.update_layer(adapter_name, method, options, dropout,
                                    inference_mode=peft_config.inference_mode, shared=shared)
                layer = target
            elif isinstance(target, BaseTunerLayer):
                raise TypeError(f"the module is already a {type(target).__name__} of another "
                                f"PEFT method; a PeftModel holds one method")
            else:
                layer = self.tuner_layer_cls(target, adapter_name, method, options, dropout,
                                             inference_mode=peft_config.inference_mode,
                                             shared=shared)
                layer.train(target.training)  # a new module trains; keep the model's mode
                if adapter_name not in self.active_adapters:
                    layer.requires_grad_(False)  # an added adapter is not trainable yet
                self._replace_module(parent, target_name, layer, target)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{current_key}: {err}") from err
        if groups is not None and shared is None:
            groups[group] = layer.adapters[adapter_name].M

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.__dict__.get("_pica_groups", {}).pop(adapter_name, None)

    def add_weighted_adapter(self, adapters, weights, adapter_name: str,
                             combination_type: str = "cat", **unsupported) -> None:
        """PEFT's ``LoraModel.add_weighted_adapter`` for our types: a new adapter
        ``adapter_name`` (not active, not trainable) combining ``adapters`` layer by layer by
        the rules of :mod:`speclora_kernels.methods.combine`: spectral slices on disjoint
        offsets fuse exactly (``cat``, weights 1); SpecLoRA's LoRA part by ``cat`` (exact)
        or ``linear`` (one rank, approximate) with its mask summed; PiCa's ``M`` summed.
        Its config describes it, so ``save_pretrained`` / ``from_pretrained`` work. PEFT's
        SVD / TIES / DARE combinations and their arguments are refused, as is an existing
        ``adapter_name`` (PEFT's LoRA would return silently)."""
        given = sorted(k for k, v in unsupported.items() if v is not None)
        if given or combination_type not in COMBINATIONS:
            raise ValueError(f"add_weighted_adapter supports combination_type in "
                             f"{COMBINATIONS} and no {given or 'other'} arguments for "
                             f"{type(self).__name__}, got {combination_type!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} exists already; name the combined "
                             f"adapter anew")
        adapters = list(adapters)
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown:
            raise ValueError(f"adapters {unknown} do not exist (have {sorted(self.peft_config)})")
        weights = check_weights(weights, len(adapters))
        groups, firsts, fused, entries = {}, {}, {}, {}
        for name, layer in self.model.named_modules():
            if not isinstance(layer, self.tuner_layer_cls):
                continue
            have = [a for a in adapters if a in layer.adapters]
            if not have:
                continue
            if len(have) != len(adapters):
                raise ValueError(f"{name}: adapted by {have} but not by "
                                 f"{sorted(set(adapters) - set(have))}; the adapters to "
                                 f"combine must target the same layers")
            dropouts = sorted({layer.adapter_dropout[a] for a in adapters})
            if len(dropouts) > 1:
                raise ValueError(f"{name}: the adapters have different dropouts {dropouts}")
            layer.materialize(adapters)
            group = share_key(name)
            try:
                adapter = combine_adapters([layer.adapters[a] for a in adapters], weights,
                                           combination_type, shared=groups.get(group))
            except CombineError as err:
                raise ValueError(f"{name} (adapters {adapters}): {err}") from None
            owner = None
            if adapter.name == "pica":
                owner = firsts.setdefault(group, name)
                owner = None if owner == name else owner
                groups.setdefault(group, adapter.M)
            fused[name] = (layer, adapter)
            entries[name] = {**adapter.config(), "dropout": dropouts[0], "share_with": owner}
        if not fused:
            raise ValueError(f"no layer holds the adapters {adapters}")
        layout, _ = peft_layout(entries)
        fields = set(CONFIG_FIELDS[self.peft_type]) - {"exclude_modules", "modules_to_save"}
        config = replace(self.peft_config[adapters[0]],
                         **{k: v for k, v in layout.items() if k in fields})
        for name, (layer, adapter) in fused.items():
            adapter.requires_grad_(False)
            layer.adapters[adapter_name] = adapter
            layer.adapter_dropout[adapter_name] = entries[name]["dropout"]
        if groups:
            self.__dict__.setdefault("_pica_groups", {})[adapter_name] = groups
        self.peft_config[adapter_name] = config

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Nothing to do: our adapters are float32 (float64 on a float64 base) from the
        start, as PEFT's ``autocast_adapter_dtype`` would make them; PEFT's cast would
        replace parameters and break a shared PiCa ``M``."""

    # -- PiCa's shared M: once in the file, back to every layer of its group on load
    @classmethod
    def _shared_keys(cls, model, adapter_name: str) -> dict[str, str]:
        """Model state-dict key of each layer's shared tensor -> its owner's key (the first
        layer holding the same parameter, in model order)."""
        owner_of, keys = {}, {}
        for name, module in model.named_modules():
            if not isinstance(module, cls.tuner_layer_cls) or adapter_name not in module.adapters:
                continue
            param = getattr(module.adapters[adapter_name], "M", None)
            if param is None:
                continue
            name = name.removeprefix("_fsdp_wrapped_module.")
            key = f"{name}.{module.attr}.{adapter_name}.M"
            keys[key] = owner_of.setdefault(id(param), key)
        return keys

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict,
                                unwanted_adapter_names):
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict,
                                              unwanted_adapter_names)
        for key, owner in cls._shared_keys(model, adapter_name).items():
            if key != owner:
                out.pop(key, None)
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        with loading():  # PEFT lists the model's keys: no deferred SVD for that
            out = super()._remap_adapter_state_dict_for_load(model, config, adapter_name,
                                                             state_dict)
        prefix = "base_model.model."
        for key, owner in cls._shared_keys(model, adapter_name).items():
            for k, o in ((key, owner), (key.removeprefix(prefix), owner.removeprefix(prefix))):
                if k != o and k not in out and o in out:
                    out[k] = out[o]
        return out


def _tuner(name: str, peft_type: str) -> type[_Tuner]:
    method = PEFT_METHODS[peft_type]
    layer = layer_class(method.attr, name.replace("Model", "Layer"))
    return type(name, (_Tuner,), {"peft_type": peft_type, "prefix": method.prefix,
                                  "tuner_layer_cls": layer, "__module__": __name__,
                                  "__qualname__": name,
                                  "__doc__": f"PEFT tuner of {CONFIGS[peft_type].__name__}."})


SpecLoraModel = _tuner("SpecLoraModel", SPECLORA)
SpectralAdapterModel = _tuner("SpectralAdapterModel", SPECTRAL)
PiCaModel = _tuner("PiCaModel", PICA)
TUNERS = {SPECLORA: SpecLoraModel, SPECTRAL: SpectralAdapterModel, PICA: PiCaModel}
SpecLoraLayer = SpecLoraModel.tuner_layer_cls
SpectralAdapterLayer = SpectralAdapterModel.tuner_layer_cls
PiCaLayer = PiCaModel.tuner_layer_cls


def register() -> None:
    """Make our PEFT types known to PEFT (idempotent): ``get_peft_model``, ``PeftModel.
    from_pretrained`` and ``load_adapter`` then find their configs and tuners."""
    from peft import mapping
    from peft.utils import register_peft_method
    from peft.utils.peft_types import PeftType

    for peft_type, tuner in TUNERS.items():
        config, prefix = CONFIGS[peft_type], tuner.prefix
        if mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is tuner:
            continue  # registered already
        if peft_type in PeftType.__members__:
            register_peft_method(name=peft_type.lower(), config_cls=config, model_cls=tuner,
                                 prefix=prefix)
            continue
        taken = [m for m in (mapping.PEFT_TYPE_TO_CONFIG_MAPPING, mapping.PEFT_TYPE_TO_TUNER_MAPPING)
                 if peft_type in m]
        if taken or prefix in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.values():
            raise RuntimeError(f"PEFT already has a method {peft_type!r} or a prefix {prefix!r} "
                               f"that is not speclora_kernels'; cannot register "
                               f"{config.__name__}")
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config
        mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner
