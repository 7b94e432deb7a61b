"""The aten ops an AdapterLinear call runs around the fused op (every one a kernel launch on
a GPU), counted by ``speclora_kernels.tools.aten_ops``: none at inference once the factors
are cached, at most 2 in a training forward (Spectral rotational: 5, its Cayley rotations)."""
import pytest
import torch

from speclora_kernels import METHODS
from speclora_kernels.tools import aten_ops

pytestmark = pytest.mark.usefixtures("torch_cpu_path", "single_thread")
ALL = sorted(METHODS)
# Training forward, ops around the op. Dense and NF4 W_res bases; on an NF4 W0 base
# ("linear4bit") the spectral methods also concatenate their frozen correction rows.
TRAINING = {"lora": 0, "pica": 0, "speclora": 1, "spectral_additive": 2,
            "spectral_rotational": 5}
TRAINING_LINEAR4BIT = {**TRAINING, "spectral_additive": 4, "spectral_rotational": 7}


def test_views_and_allocations_are_not_counted():
    x = torch.randn(4, 6)
    with aten_ops.count_ops() as counts:
        x.T, x[1:], x.view(6, 4), x.detach(), x.reshape(24), torch.empty(3)
        _ = x + 1, x.to(torch.float16), x.T.contiguous()
        x.add_(1)
    assert counts.around == {"aten.add": 1, "aten._to_copy": 1, "aten.clone": 1, "aten.add_": 1}
    assert counts.op_calls == 0 and counts.n_inside == 0


def test_the_op_is_counted_apart():
    layer = aten_ops.build_layer("lora", size=32, r=2, dtype=torch.float32)
    x = torch.randn(3, 32)
    c = aten_ops.layer_call_counts(layer, x)
    assert [k.op_calls for k in c["inference"]] == [1, 1]
    assert c["training_forward"].op_calls == 1 and c["training_backward"].op_calls == 0
    # the CPU backend's own aten ops (or the Triton launches) are the op's, not "around"
    assert all(k.n_inside + k.launches > 0 for k in (*c["inference"], c["training_forward"]))
    assert c["training_backward"].n_inside + c["training_backward"].launches > 0


@pytest.mark.parametrize("dtype,base", [(torch.bfloat16, "dense"), (torch.float32, "dense"),
                                        (torch.bfloat16, "nf4"), (torch.bfloat16, "linear4bit")])
@pytest.mark.parametrize("method", ALL)
def test_ops_around_the_op(method, dtype, base):
    layer = aten_ops.build_layer(method, size=64, r=4, dtype=dtype, base=base)
    x = torch.randn(3, 64, dtype=dtype)
    c = aten_ops.layer_call_counts(layer, x, calls=3)
    first, *cached = c["inference"]
    assert all(k.n_around == 0 for k in cached), [k.around for k in cached]
    assert first.n_around > 0 or method == "lora" and dtype == torch.float32
    want = (TRAINING_LINEAR4BIT if base == "linear4bit" else TRAINING)[method]
    assert c["training_forward"].n_around == want, c["training_forward"].around
    if method != "spectral_rotational" and base != "linear4bit":
        assert want <= 2
    assert all(k.op_calls == 1 for k in (*c["inference"], c["training_forward"]))


def test_command_prints_every_method(capsys):
    aten_ops.main(["--dtype", "float32"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows[1:]] == ALL
    speclora = next(r for r in rows if r.startswith("| speclora |"))
    assert speclora.split(" | ")[2:4] == ["0", "1"]
