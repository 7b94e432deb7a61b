"""Hundreds of corrupted adapter files thrown at the loaders, seeded.

Every case must end one of two ways:
- rejected with ``AdapterFileError`` (a ``ValueError``), the model left unchanged;
- loaded, with exactly the adapter that was saved (ours: only when the damage is confined to
  the ``.json`` copy, which the loader reports and ignores in favour of the config committed,
  with a checksum, inside the safetensors file) or exactly the bytes on disk (PEFT's format,
  which has no checksum: a flipped bit inside tensor data is a valid file with other numbers).
Any other exception, a crash, or garbage loaded fails the test. The counts per outcome are
printed (``pytest -s``) and checked against floors. Runtime ~14 s (4 tests).
"""
import json
import random
import warnings

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import nn

from speclora_kernels import AdapterFileError, load_layer_adapter
from speclora_kernels.integrations import adapter_layers, inject
from speclora_kernels.modules import AdapterLinear
from speclora_kernels.persistence import (
    export_peft_adapter,
    load_adapter,
    load_peft_adapter,
    save_adapter,
    save_layer_adapter,
)
from speclora_kernels.persistence.container import CONFIG_KEY, SHA_KEY, canonical_header, config_digest, tensor_table
from speclora_kernels.persistence.peft_methods import peft_key

pytestmark = pytest.mark.usefixtures("torch_cpu_path", "single_thread")
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


class Tiny(nn.Module):
    """Two linear layers with fixed weights (the base fingerprints must match)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.q_proj, self.up_proj = nn.Linear(24, 16), nn.Linear(16, 40, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))


def trained_tiny():
    model = inject(Tiny(), "speclora", ["q_proj", "up_proj"], r=2, k=2, alpha=4, verbose=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen))
    return model


def adapter_bits(model) -> dict[str, bytes]:
    return {f"{name}.{key}": t.contiguous().view(torch.uint8).numpy().tobytes()
            for name, layer in adapter_layers(model).items()
            for key, t in layer.adapter_tensors().items()}


def split(blob: bytes):
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header, data: bytes, text: str | None = None) -> bytes:
    raw = (text if text is not None else json.dumps(header)).encode("utf-8", "surrogatepass")
    return len(raw).to_bytes(8, "little") + raw + data


def forge(blob: bytes, config_text: str) -> bytes:
    """``blob`` with another embedded config and a *valid* checksum for it: what a buggy or
    hostile writer produces, past the integrity check, down to the schema."""
    header, data = split(blob)
    header["__metadata__"][CONFIG_KEY] = config_text
    try:
        header["__metadata__"][SHA_KEY] = config_digest(config_text, data)
    except UnicodeEncodeError:
        pass
    return join(header, data)


# ---------------------------------------------------------------- mutation families
def byte_mutations(blob: bytes, rng: random.Random):
    """Truncations in every region, trailing bytes, and single-bit flips everywhere."""
    n = int.from_bytes(blob[:8], "little")
    cuts = list(range(0, 9)) + [rng.randrange(9, 8 + n) for _ in range(25)] + [8 + n] + \
        [rng.randrange(9 + n, len(blob)) for _ in range(25)] + [len(blob) - 1]
    for cut in cuts:
        yield f"truncate@{cut}", blob[:cut]
    yield "trailing zero", blob + b"\0"
    yield "trailing garbage", blob + bytes(rng.randrange(256) for _ in range(100))
    for bit in range(64):
        yield f"length bit {bit}", bytes(
            (int.from_bytes(blob[:8], "little") ^ (1 << bit)).to_bytes(8, "little")) + blob[8:]
    positions = [rng.randrange(8, 8 + n) for _ in range(150)] + \
        [rng.randrange(8 + n, len(blob)) for _ in range(100)]
    for pos in positions:
        flipped = bytearray(blob)
        flipped[pos] ^= 1 << rng.randrange(8)
        yield f"flip@{pos}", bytes(flipped)


def header_mutations(blob: bytes, rng: random.Random):
    """The safetensors header edited as JSON, re-framed with a correct length."""
    header, data = split(blob)
    names = sorted(k for k in header if k != "__metadata__")

    def edited(fn):
        h = json.loads(json.dumps(header))
        fn(h)
        return join(h, data) if h != header else blob  # a no-op edit is skipped

    for name in rng.sample(names, 4):
        for dtype in ["F16", "I32", "F64", "U8", "F8_E4M3", "X", 5, None, ["F32"]]:
            yield f"dtype {dtype!r}", edited(lambda h: h[name].update(dtype=dtype))
        shape = header[name]["shape"]
        for bad in [shape + [1], shape[::-1] if len(shape) > 1 else [1, *shape], [-1], [2 ** 62],
                    [], "3", [1.5], [True], None, [2 ** 31] * 2]:
            yield f"shape {bad!r}", edited(lambda h: h[name].update(shape=bad))
        begin, end = header[name]["data_offsets"]
        for bad in [[begin + 1, end + 1], [begin - 1, end - 1], [end, begin], [begin, 2 ** 64],
                    [-8, end], [begin, end + 4], [0, end - begin], [begin], [str(begin), end],
                    [begin + 0.0, end]]:
            yield f"offsets {bad!r}", edited(lambda h: h[name].update(data_offsets=bad))
        yield "extra field", edited(lambda h: h[name].update(note="x"))
        yield "entry not an object", edited(lambda h: h.update({name: [1, 2]}))
        yield "missing tensor", edited(lambda h: h.pop(name))
    yield "extra empty tensor", edited(lambda h: h.update(
        {"evil": {"dtype": "F32", "shape": [0], "data_offsets": [len(data), len(data)]}}))
    yield "extra tensor with data", join({**header, "evil": {
        "dtype": "F32", "shape": [2], "data_offsets": [len(data), len(data) + 8]}},
        data + b"\0" * 8)
    text = json.dumps(header)
    first = json.dumps(names[0])
    yield "duplicate key", join(None, data, text.replace(
        "{", "{" + first + ': {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, ', 1))
    yield "non-UTF8 header", len(text).to_bytes(8, "little") + \
        text.encode().replace(b"F32", b"F\xff2", 1) + data
    yield "lone surrogate", join(None, data, text.replace("F32", "F\\udcff2", 1))
    for top in ["[]", '"x"', "1", "null", "{", "", " " * 10, "[" * 100000 + "]" * 100000]:
        yield f"header {top[:12]!r}", join(None, data, top)
    yield "NaN in header", join(None, data, text.replace("[0,", "[NaN,", 1))
    yield "huge int in header", join(None, data, text.replace("[0,", "[" + "9" * 5000 + ",", 1))
    meta = header["__metadata__"]
    for key in sorted(meta):
        yield f"metadata without {key}", edited(lambda h: h["__metadata__"].pop(key))
        yield f"metadata {key} changed", edited(lambda h: h["__metadata__"].update({key: "x"}))
    yield "metadata not an object", edited(lambda h: h.update(__metadata__=["x"]))
    yield "metadata value not a string", edited(lambda h: h["__metadata__"].update(x=1))
    yield "metadata extra key", edited(lambda h: h["__metadata__"].update(x="1"))
    if CONFIG_KEY in meta:
        yield "config text changed", edited(lambda h: h["__metadata__"].update(
            {CONFIG_KEY: meta[CONFIG_KEY].replace('"r": 2', '"r": 3')}))


def config_mutations(blob: bytes, layer_name: str):
    """Configs with a valid checksum (forged) that the schema or the model must refuse."""
    text = split(blob)[0]["__metadata__"][CONFIG_KEY]
    config = json.loads(text)

    def edited(fn):
        c = json.loads(text)
        fn(c)
        return forge(blob, json.dumps(c))

    layer = config["layers"][layer_name]
    yield "config NaN", forge(blob, text.replace('"alpha": 4.0', '"alpha": NaN'))
    yield "config Infinity", forge(blob, text.replace('"alpha": 4.0', '"alpha": Infinity'))
    yield "config 1e999", forge(blob, text.replace('"alpha": 4.0', '"alpha": 1e999'))
    yield "config duplicate key", forge(blob, text.replace('"alpha": 4.0',
                                                           '"alpha": 4.0, "alpha": 5'))
    yield "config garbage", forge(blob, "garbage")
    yield "config lone surrogate", forge(blob, text.replace("speclora", "spec\udcfflora", 1))
    yield "config deep", forge(blob, "[" * 100000 + "]" * 100000)
    yield "config list", forge(blob, "[]")
    for key, values in {
        "method": ["dora", "", None, 1, "LORA", "lora"],
        "r": [0, -1, 3, "2", 2.0, True, None, 2 ** 70],
        "k": [0, 3, 100, "2", None],
        "rank": [0, 3, 5, 4.0],
        "alpha": [0, -4.0, "4", None, True, 1e300],
        "in_features": [0, 23, 25, -24, 2 ** 40, "24"],
        "out_features": [0, 17, 2 ** 40],
        "dropout": [-0.1, 1.0, "0", None, 1e300],
        "adapter_dtype": ["float16", "int64", "pickle", None],
        "base_dtype": ["int8", None, 4],
        "bias": [0, "true", None],
        "share_with": [layer_name, "nope", 5],
        "svd": ["magic", 1],
        "quantize": ["fp4", True],
        "source": ["os.system('x')", "Embedding", 1],
        "base_fingerprint": ["0" * 64, "z" * 64, "ab", 5],
        "base_quant": ["fp4"],
        "evil": ["__import__('os')"],
    }.items():
        for value in values:
            yield f"{key}={value!r}", edited(lambda c: c["layers"][layer_name].update({key: value}))
    for key in ["method", "r", "rank", "alpha", "k", "in_features", "dropout", "base_fingerprint"]:
        yield f"missing {key}", edited(lambda c: c["layers"][layer_name].pop(key))
    for key, values in {"format": ["speclora_kernels.adapter2", None], "format_version":
                        [0, 3, "1", 2.0, None, True], "library_version": [5, ""],
                        "layers": [[], {}, None], "tensors": [[], None]}.items():
        for value in values:
            yield f"top {key}={value!r}", edited(lambda c: c.update({key: value}))
    yield "top unknown key", edited(lambda c: c.update(code="print(1)"))
    yield "extra layer", edited(lambda c: c["layers"].update({"k_proj": layer}))
    yield "missing layer", edited(lambda c: c["layers"].pop(layer_name))
    yield "layer not a dict", edited(lambda c: c["layers"].update({layer_name: [1]}))
    tname = peft_key(layer_name, "speclora", "A")
    yield "table extra tensor", edited(lambda c: c["tensors"].update(
        {"x": {"shape": [1], "dtype": "float32"}}))
    yield "table missing tensor", edited(lambda c: c["tensors"].pop(tname))
    yield "table wrong shape", edited(lambda c: c["tensors"][tname].update(shape=[4, 24]))
    yield "table wrong dtype", edited(lambda c: c["tensors"][tname].update(dtype="float64"))
    # Tensors and table consistent with each other, not with the layer's method.
    tensors = load_bytes(blob)
    for label, change in [("tensor dropped", lambda t: t.pop(tname)),
                          ("tensor added", lambda t: t.update(x=torch.zeros(3))),
                          ("tensor resized", lambda t: t.update({tname: torch.zeros(3, 24)})),
                          ("tensor float64", lambda t: t.update({tname: t[tname].double()})),
                          ("tensor int", lambda t: t.update({tname: t[tname].int()}))]:
        t = dict(tensors)
        change(t)
        c = json.loads(text)
        c["tensors"] = tensor_table(t)
        ctext = json.dumps(c, sort_keys=True)
        plain = save_bytes(t)
        payload = plain[8 + int.from_bytes(plain[:8], "little"):]
        yield label, save_bytes(t, metadata={"format": "pt", CONFIG_KEY: ctext,
                                              SHA_KEY: config_digest(ctext, payload)})


def json_copy_mutations(body: bytes, rng: random.Random):
    """Damage confined to adapter_config.json (the readable copy)."""
    for cut in sorted(rng.sample(range(len(body)), 20)) + [0]:
        yield f"json truncate@{cut}", body[:cut]
    for _ in range(40):
        flipped = bytearray(body)
        flipped[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
        yield "json flip", bytes(flipped)
    yield "json non-UTF8", body.replace(b"peft_type", b"peft\xfftype", 1)
    yield "json NaN", body.replace(b'"lora_alpha": 4.0', b'"lora_alpha": NaN', 1)
    yield "json duplicate", body.replace(b'"lora_alpha": 4.0', b'"lora_alpha": 4.0, '
                                         b'"lora_alpha": 9.0', 1)
    yield "json edited r", body.replace(b'"r": 2', b'"r": 3', 1)
    yield "json huge", body + b" " * (17 << 20)
    yield "json peft_type", body.replace(b"{", b'{"peft_type": "LORA", ', 1)


# ---------------------------------------------------------------- the runs
class Tally(dict):
    def add(self, outcome: str) -> None:
        self[outcome] = self.get(outcome, 0) + 1


def _load_ours(directory):
    model = Tiny()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_adapter(model, directory)
    except AdapterFileError:
        assert not adapter_layers(model), "a rejected file changed the model"
        return "rejected", None, []
    return "loaded", model, caught


def test_fuzz_model_adapter(tmp_path, capsys):
    rng = random.Random(0)
    model = trained_tiny()
    save_adapter(model, tmp_path)
    want = adapter_bits(model)
    blob = (tmp_path / WEIGHTS).read_bytes()
    body = (tmp_path / CONFIG).read_bytes()
    tally, failures = Tally(), []
    families = {"bytes": byte_mutations(blob, rng), "header": header_mutations(blob, rng),
                "config": config_mutations(blob, "q_proj")}
    for family, cases in families.items():
        for label, bad in cases:
            if bad == blob:
                continue  # a no-op edit
            (tmp_path / WEIGHTS).write_bytes(bad)
            (tmp_path / CONFIG).write_bytes(body)
            outcome, _, _ = _load_ours(tmp_path)
            tally.add(f"{family} {outcome}")
            if outcome != "rejected":
                failures.append(f"{family}: {label} loaded")
    (tmp_path / WEIGHTS).write_bytes(blob)
    for label, bad in json_copy_mutations(body, rng):
        assert bad != body, label
        (tmp_path / CONFIG).write_bytes(bad)
        outcome, loaded, caught = _load_ours(tmp_path)
        tally.add(f"json {outcome}")
        if outcome == "loaded":  # only the exact saved adapter, and never silently
            if adapter_bits(loaded) != want:
                failures.append(f"json: {label} loaded other numbers")
            if not any("using the committed config" in str(w.message) for w in caught):
                failures.append(f"json: {label} loaded without a warning")
    with capsys.disabled():
        print(f"\nmodel adapter fuzz: {dict(sorted(tally.items()))}")
    assert not failures, failures[:10]
    assert sum(v for k, v in tally.items() if k.endswith("rejected")) >= 500, tally
    assert tally.get("json loaded", 0) >= 1 and tally.get("json rejected", 0) >= 20, tally


def test_fuzz_layer_adapter(tmp_path, capsys):
    """The per-layer files (save_layer_adapter / load_layer_adapter): every corruption of
    the safetensors file is rejected and the layer keeps its values."""
    rng = random.Random(1)
    src = trained_tiny().q_proj
    st_path, json_path = save_layer_adapter(src, tmp_path / "layer")
    blob = open(st_path, "rb").read()
    dst = AdapterLinear.from_linear(Tiny().q_proj, "speclora", r=2, k=2, alpha=4)
    before = {k: t.clone() for k, t in dst.adapter_tensors().items()}
    tally, failures = Tally(), []
    for label, bad in [*byte_mutations(blob, rng), *header_mutations(blob, rng)]:
        if bad == blob:
            continue
        open(st_path, "wb").write(bad)
        try:
            load_layer_adapter(dst, tmp_path / "layer")
        except AdapterFileError:
            tally.add("rejected")
        else:
            failures.append(label)
    with capsys.disabled():
        print(f"\nlayer adapter fuzz: {tally}")
    assert not failures, failures[:10]
    assert all(torch.equal(t, before[k]) for k, t in dst.adapter_tensors().items())
    assert tally["rejected"] >= 400


def test_fuzz_peft_adapter(tmp_path, capsys):
    """PEFT LoRA directories: structural damage is rejected before the model changes;
    PEFT's format has no checksum, so a flip inside tensor data loads exactly the bytes on
    disk (checked against safetensors' own reader) and nothing else."""
    rng = random.Random(2)
    lora = inject(Tiny(), "lora", ["q_proj", "up_proj"], r=2, alpha=4, verbose=False)
    export_peft_adapter(lora, tmp_path)
    blob = canonical_header((tmp_path / WEIGHTS).read_bytes())  # fixed bytes: seeded cases
    n = int.from_bytes(blob[:8], "little")
    tally, failures = Tally(), []
    for label, bad in [*byte_mutations(blob, rng), *header_mutations(blob, rng)]:
        if bad == blob:
            continue
        (tmp_path / WEIGHTS).write_bytes(bad)
        model = Tiny()
        try:
            load_peft_adapter(model, tmp_path)
        except AdapterFileError:
            assert not adapter_layers(model)
            tally.add("rejected")
            continue
        on_disk = load_bytes(bad)
        for name, layer in adapter_layers(model).items():
            for part in "AB":
                key = f"base_model.model.{name}.lora_{part}.weight"
                if not torch.equal(getattr(layer.adapter, part).view(torch.uint8),
                                   on_disk[key].view(torch.uint8)):
                    failures.append(f"{label}: {key} is not the bytes on disk")
        in_data = label.startswith("flip@") and int(label[5:]) >= 8 + n
        tally.add("loaded: flip in tensor data" if in_data else "loaded: metadata change")
    with capsys.disabled():
        print(f"\nPEFT adapter fuzz: {tally}")
    assert not failures, failures[:10]
    assert tally["rejected"] >= 300 and tally["loaded: flip in tensor data"] >= 50, tally


def test_fuzz_trainer_state(tmp_path, capsys):
    """save_checkpoint's trainer_state.safetensors (optimizer + RNG states, checksummed):
    every corruption is refused before the model, the optimizer or the RNG change."""
    import numpy as np

    from speclora_kernels.persistence import load_checkpoint, save_checkpoint
    from speclora_kernels.persistence.checkpoint import STATE_NAME

    rng = random.Random(3)
    random.seed(0)  # the global RNG states are saved: fixed states, fixed file, seeded cases
    np.random.seed(0)
    model = trained_tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(5, 24)
    model.up_proj(model.q_proj(x)).square().mean().backward()
    opt.step()
    save_checkpoint(tmp_path, model, opt, step=1)
    blob = (tmp_path / STATE_NAME).read_bytes()
    params = adapter_bits(model)
    moments = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    torch_rng = torch.get_rng_state()
    tally, failures = Tally(), []
    for label, bad in [*byte_mutations(blob, rng), *header_mutations(blob, rng)]:
        if bad == blob:
            continue
        (tmp_path / STATE_NAME).write_bytes(bad)
        try:
            load_checkpoint(tmp_path, model, opt)
        except AdapterFileError:
            tally.add("rejected")
        else:
            failures.append(label)
    with capsys.disabled():
        print(f"\ntrainer state fuzz: {tally}")
    assert not failures, failures[:10]
    assert adapter_bits(model) == params and torch.equal(torch.get_rng_state(), torch_rng)
    assert all(torch.equal(v, moments[k]) for k, v in opt.state_dict()["state"][0].items())
    assert tally["rejected"] >= 400
