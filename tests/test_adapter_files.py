"""save_adapter / load_adapter on a whole model: PEFT's file names, only adapter tensors,
bit-exact reload into a fresh model, clear errors for the wrong model."""
import json
import os

import pytest
import torch
from _tiny_models import logits, options, perturb, tiny_llama, token_ids  # noqa: F401
from safetensors.torch import load_file, save_file

from speclora_kernels import METHODS, AdapterFileError, AdapterLinear
from speclora_kernels.integrations import adapter_layers, inject
from speclora_kernels.persistence import load_adapter, save_adapter
from speclora_kernels.persistence.container import CONFIG_KEY, TensorFile, encode_container, tensor_table
from speclora_kernels.persistence.peft_methods import peft_key

pytestmark = pytest.mark.usefixtures("torch_cpu_path", "single_thread")
ALL = sorted(METHODS)


def embedded(directory) -> dict:
    """Our config, committed inside the safetensors metadata (adapter_config.json is PEFT's)."""
    with TensorFile(directory / "adapter_model.safetensors") as file:
        return json.loads(file.metadata[CONFIG_KEY])


def trained(method, targets="all-linear", seed=0):
    model = inject(tiny_llama(seed), method, targets, verbose=False, **options(method))
    perturb(model)
    return model


@pytest.mark.parametrize("method", ALL)
def test_save_load_fresh_model_bit_exact(method, tmp_path):
    ids = token_ids()
    model = trained(method)
    want = logits(model, ids)
    save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]

    # Only the adapters: trainable tensors + frozen spectral factors, never a base weight;
    # a shared PiCa M once per target name.
    saved = load_file(tmp_path / "adapter_model.safetensors")
    expected = {}
    seen = set()
    for name, layer in adapter_layers(model).items():
        for key, t in layer.adapter.state_dict(keep_vars=True).items():
            if id(t) not in seen:
                seen.add(id(t))
                expected[peft_key(name, method, key)] = t
    assert set(saved) == set(expected)
    assert all(torch.equal(saved[k], v) for k, v in expected.items())
    if method == "pica":
        assert sum(k.endswith(".M") for k in saved) == 7  # 7 target names, 2 layers each
    config = embedded(tmp_path)
    assert config["format"] == "speclora_kernels.adapter" and len(config["layers"]) == 14
    assert config["format_version"] == 2
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_config == config["peft_config"]
    assert peft_config["peft_type"] == {"lora": "LORA", "speclora": "SPECLORA_KERNELS_SPECLORA",
                                        "pica": "SPECLORA_KERNELS_PICA"}.get(
                                            method, "SPECLORA_KERNELS_SPECTRAL")

    fresh = tiny_llama()
    assert load_adapter(fresh, tmp_path) is fresh
    assert torch.equal(logits(fresh, ids), want)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    if method == "pica":
        layers = adapter_layers(fresh)
        assert layers["model.layers.0.mlp.up_proj"].adapter.M is \
            layers["model.layers.1.mlp.up_proj"].adapter.M


def test_load_into_injected_model(tmp_path):
    ids = token_ids()
    model = trained("speclora")
    save_adapter(model, tmp_path)
    target = inject(tiny_llama(), "speclora", "all-linear", verbose=False, **options("speclora"))
    load_adapter(target, tmp_path)
    assert torch.equal(logits(target, ids), logits(model, ids))


def test_frozen_factors_from_another_svd_are_used(tmp_path):
    """The saved P, sigma, Q are what the adapter was trained with: loading them into a layer
    whose own SVD differs (e.g. computed elsewhere) reproduces the trained outputs."""
    ids = token_ids()
    model = trained("spectral_rotational", ["q_proj"])
    want = logits(model, ids)
    save_adapter(model, tmp_path)
    target = inject(tiny_llama(), "spectral_rotational", ["q_proj"], r=4, svd="randomized",
                    verbose=False)
    load_adapter(target, tmp_path)
    torch.testing.assert_close(logits(target, ids), want, rtol=1e-5, atol=1e-5)


def test_mismatches_raise_and_leave_model_unchanged(tmp_path):
    model = trained("speclora", ["q_proj", "v_proj"])
    save_adapter(model, tmp_path)

    other = tiny_llama(seed=1)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj: the adapter belongs "
                                         "to a different pre-trained weight"):
        load_adapter(other, tmp_path)
    assert not adapter_layers(other)
    load_adapter(other, tmp_path, check_base=False)  # explicit opt-out
    assert len(adapter_layers(other)) == 4

    with pytest.raises(ValueError, match="'model.layers.1.self_attn.q_proj', which the model lacks"):
        load_adapter(tiny_llama(layers=1), tmp_path)
    wrong_rank = inject(tiny_llama(), "speclora", ["q_proj", "v_proj"], r=2, k=4, verbose=False)
    with pytest.raises(ValueError, match="q_proj: the adapter has r=4 but the model's layer has r=2"):
        load_adapter(wrong_rank, tmp_path)
    more = inject(tiny_llama(), "speclora", ["q_proj", "v_proj", "k_proj"], verbose=False,
                  **options("speclora"))
    with pytest.raises(ValueError, match="adapter layers the file lacks"):
        load_adapter(more, tmp_path)
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        load_adapter(tiny_llama(), tmp_path / "missing")


def rewrite(directory, edit=None, tensors_edit=None):
    """Re-encode a saved adapter with an edited config / tensors, checksum and all: what a
    hostile or buggy writer could produce, past the integrity checks."""
    config = embedded(directory)
    tensors = load_file(directory / "adapter_model.safetensors")
    if edit:
        edit(config)
    if tensors_edit:
        tensors_edit(tensors)
        config["tensors"] = tensor_table(tensors)
    blob, body = encode_container(tensors, config)
    if isinstance(config.get("peft_config"), dict):
        body = json.dumps(config["peft_config"], indent=2, sort_keys=True).encode()
    (directory / "adapter_model.safetensors").write_bytes(blob)
    (directory / "adapter_config.json").write_bytes(body)


def test_corrupt_files_are_rejected(tmp_path):
    model = trained("lora", ["q_proj"])
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    # Without our metadata it is a PEFT LoRA directory, checked as such.
    save_file({**tensors, name: tensors[name][:2].contiguous()}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match=r"q_proj: lora_A \(2, 64\) / lora_B \(64, 4\) do "
                                               r"not fit rank 4"):
        load_adapter(tiny_llama(), tmp_path)
    save_adapter(model, tmp_path)
    rewrite(tmp_path, tensors_edit=lambda t: t.update({name: t[name][:2].contiguous()}))
    with pytest.raises(AdapterFileError, match=rf"tensor '{name}' is torch.float32 \[2, 64\], "
                                               rf"expected torch.float32 \[4, 64\] \(from the "
                                               rf"layers in its config\)"):
        load_adapter(tiny_llama(), tmp_path)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="neither a speclora_kernels adapter nor a PEFT one"):
        load_adapter(tiny_llama(), tmp_path)


@pytest.mark.parametrize("method", ["lora", "speclora", "pica"])
def test_files_written_before_svd_was_saved_load(method, tmp_path):
    """Earlier files carry ``svd: null`` on every layer, lora's too (the solver was not
    recorded when it was the default); they load, with svd's default."""
    ids = token_ids()
    model = trained(method, ["q_proj", "v_proj"])
    want = logits(model, ids)
    save_adapter(model, tmp_path)
    config = embedded(tmp_path)
    assert all(("svd" in e) == (method != "lora") for e in config["layers"].values())
    rewrite(tmp_path, lambda c: [e.update(svd=None) for e in c["layers"].values()])
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, ids), want)
    if method != "lora":
        assert {layer.adapter.svd for layer in adapter_layers(fresh).values()} == {"auto"}


LAYER = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(format_version=3), "format_version=3 must be an int in"),
    (lambda c: c.update(format="safetensors"), "format='safetensors' must be "
                                               "'speclora_kernels.adapter'"),
    (lambda c: c["layers"][LAYER].update(method="dora"), "method='dora' must be a registered"),
    (lambda c: c["layers"][LAYER].update(base_fingerprint="x" * 64), "base_fingerprint='xxx"),
    (lambda c: c["layers"][LAYER].update(k=3), r"not its own \['k'\]"),
    (lambda c: c["layers"][LAYER].update(in_features=2**40), "in_features=1099511627776 must be"),
    (lambda c: c["layers"][LAYER].update(share_with=LAYER), "share_with=.* must name a pica layer"),
    (lambda c: c.update(layers={}), "layers={} must be a non-empty map"),
    (lambda c: c.update(extra=1), r"unknown keys \['extra'\]"),
])
def test_config_schema_rejects(edit, message, tmp_path):
    model = trained("lora", ["q_proj"])
    save_adapter(model, tmp_path)
    rewrite(tmp_path, edit)
    fresh = tiny_llama()
    with pytest.raises(AdapterFileError, match=message) as err:
        load_adapter(fresh, tmp_path)
    assert str(tmp_path) in str(err.value)
    assert not adapter_layers(fresh)


def test_mismatched_base_names_directory_and_layer(tmp_path):
    save_adapter(trained("lora", ["q_proj"]), tmp_path)
    with pytest.raises(AdapterFileError, match=rf"^{tmp_path}: {LAYER}: the adapter belongs to "
                                               rf"a different pre-trained weight"):
        load_adapter(tiny_llama(seed=1), tmp_path)


def test_pickle_is_never_loaded(tmp_path):
    save_adapter(trained("lora", ["q_proj"]), tmp_path)
    os.rename(tmp_path / "adapter_model.safetensors", tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="adapter_model.bin, a pickle file, which is never "
                                               "loaded"):
        load_adapter(tiny_llama(), tmp_path)


def test_rejected_file_leaves_model_unchanged(tmp_path):
    """Even a failure found last (the checksum, after every structural check) happens
    before the model changes."""
    ids = token_ids()
    target = inject(tiny_llama(), "lora", ["q_proj"], verbose=False, **options("lora"))
    want = logits(target, ids)
    save_adapter(trained("lora", ["q_proj"]), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x10  # a bit inside the last tensor's data
    path.write_bytes(bytes(blob))
    with pytest.raises(AdapterFileError, match="checksum mismatch"):
        load_adapter(target, tmp_path)
    assert torch.equal(logits(target, ids), want)


def test_training_resumes_after_load(tmp_path):
    """A loaded adapter trains: gradients reach every adapter tensor and nothing else."""
    model = trained("speclora", ["q_proj", "down_proj"])
    save_adapter(model, tmp_path)
    fresh = load_adapter(tiny_llama(), tmp_path)
    fresh.train()
    ids = token_ids()
    fresh(input_ids=ids, labels=ids).loss.backward()
    for name, p in fresh.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, name


def test_nf4_round_trip_bit_exact(tmp_path):
    from speclora_kernels.integrations.bnb import quantize_nf4

    ids = token_ids()
    model = inject(quantize_nf4(tiny_llama()), "speclora", "all-linear", verbose=False,
                   **options("speclora"))
    perturb(model)
    want = logits(model, ids)
    save_adapter(model, tmp_path)
    config = embedded(tmp_path)
    assert {e["source"] for e in config["layers"].values()} == {"Linear4bit"}
    fresh = load_adapter(quantize_nf4(tiny_llama()), tmp_path)
    assert all(isinstance(m, AdapterLinear) for m in adapter_layers(fresh).values())
    assert torch.equal(logits(fresh, ids), want)
    with pytest.raises(ValueError, match="trained on a Linear4bit base, the model's layer is a Linear"):
        load_adapter(tiny_llama(), tmp_path)
