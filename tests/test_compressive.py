"""Infini-attention formulas against naive loops over tokens and heads, written here from the
paper's equations (arXiv:2404.07143, eqs. 3-6), not from the code under test."""

import pytest
import torch
import torch.nn.functional as F

from memstack.memory.base import ClosedSegment, LayerRecord
from memstack.memory.compressive import Compressive, CompressiveState, init_state, retrieve, update
from memstack.memory.mixer import MemoryMixer


def sigma(x):
    return F.elu(x.double()) + 1


def naive_retrieve(M, z, q, group):
    """A_mem[b, h, t] = sigma(q_t) M / (sigma(q_t) . z), query head h reading KV head h // group."""
    B, H, T, _ = q.shape
    out = torch.zeros(B, H, T, M.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                s = sigma(q[b, h, t])
                out[b, h, t] = (s @ M[b, h // group].double()) / (s @ z[b, h // group].double())
    return out


def naive_update(M, z, k, v, rule, valid=None):
    """Token by token sums of the segment's writes (all read against M_{s-1}, z_{s-1})."""
    M, z = M.double().clone(), z.double().clone()
    M0, z0 = M.clone(), z.clone()
    B, H, T, _ = k.shape
    for b in range(B):
        for h in range(H):
            for t in range(T):
                if valid is not None and not valid[b, t]:
                    continue
                s = sigma(k[b, h, t])
                val = v[b, h, t].double()
                if rule == "delta" and z0[b, h].sum() > 0:
                    val = val - (s @ M0[b, h]) / (s @ z0[b, h])
                M[b, h] += torch.outer(s, val)
                z[b, h] += s
    return M, z


def random_state(B, H, dk, dv):
    k = torch.randn(B, H, 5, dk)
    v = torch.randn(B, H, 5, dv)
    return naive_update(torch.zeros(B, H, dk, dv), torch.zeros(B, H, dk), k, v, "linear")


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 3), (4, 1)])
def test_retrieve_matches_naive_with_gqa(heads, kv_heads):
    M, z = random_state(2, kv_heads, 8, 6)
    q = torch.randn(2, heads, 5, 8)
    out = retrieve(CompressiveState(M.float(), z.float()), q)
    torch.testing.assert_close(out.double(), naive_retrieve(M, z, q, heads // kv_heads), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", ["linear", "delta"])
@pytest.mark.parametrize("start_empty", [True, False])
def test_update_matches_naive(rule, start_empty):
    B, H, T, dk, dv = 2, 3, 7, 8, 6
    if start_empty:
        M, z = torch.zeros(B, H, dk, dv, dtype=torch.float64), torch.zeros(B, H, dk, dtype=torch.float64)
    else:
        M, z = random_state(B, H, dk, dv)
    k, v = torch.randn(B, H, T, dk), torch.randn(B, H, T, dv)
    new = update(CompressiveState(M.float(), z.float()), k, v, rule=rule)
    ref_M, ref_z = naive_update(M, z, k, v, rule)
    torch.testing.assert_close(new.M.double(), ref_M, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(new.z.double(), ref_z, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_padded_positions_are_never_written_even_if_inf(rule):
    B, H, T = 2, 2, 6
    M, z = random_state(B, H, 4, 4)
    k, v = torch.randn(B, H, T, 4), torch.randn(B, H, T, 4)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, 4:] = False
    valid[1, :3] = False
    k[0, :, 4:] = float("inf")
    v[1, :, :3] = float("nan")
    new = update(CompressiveState(M.float(), z.float()), k, v, valid, rule)
    ref_M, ref_z = naive_update(M, z, k, v, rule, valid)
    torch.testing.assert_close(new.M.double(), ref_M, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(new.z.double(), ref_z, atol=1e-4, rtol=1e-5)


def test_gate_mixes_and_empty_memory_returns_local_exactly():
    mixer = MemoryMixer(num_heads=4, kinds={"compressive": 0.0})
    gate = mixer.gates["compressive"]
    with torch.no_grad():
        gate.copy_(torch.tensor([-2.0, -1.0, 1.0, 3.0]))
    q = torch.randn(2, 4, 5, 8)
    local = torch.randn(2, 5, 4, 6)
    M, z = random_state(2, 2, 8, 6)
    state = CompressiveState(M.float(), z.float())
    state = CompressiveState(state.M, state.z.clone())
    state.z[1] = 0  # row 1 has written nothing yet
    state.M[1] = 0
    out = mixer.mix(local, {"compressive": Compressive([0]).read(state, q)})
    g = torch.sigmoid(gate.detach().double())
    A_mem = naive_retrieve(M, z, q, 2).transpose(1, 2)  # (B, T, H, dv)
    expected0 = g[None, :, None] * A_mem[0] + (1 - g[None, :, None]) * local[0].double()
    torch.testing.assert_close(out[0].double(), expected0, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[1], local[1])


def test_state_is_float32_under_bf16_autocast():
    kind, mixer = Compressive([0]), MemoryMixer(num_heads=2, kinds={"compressive": 0.0})
    state = init_state(1, 2, 4, 4, "cpu")
    k = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new = kind.write(state, LayerRecord(k, k), ClosedSegment(k[:, 0, :, 0].long(), None, 0, 3, None))
        readout = kind.read(new, torch.randn(1, 2, 3, 4, dtype=torch.bfloat16))
        out = mixer.mix(torch.randn(1, 3, 2, 4, dtype=torch.bfloat16), {"compressive": readout})
    assert new.M.dtype == torch.float32 and new.z.dtype == torch.float32
    assert out.dtype == torch.bfloat16


def test_checkpoints_with_the_old_gate_name_still_load():
    """memstack <= 0.1 saved the compressive gate as ``...memstack_memory.gate``."""
    from memstack import MemoryStack, StackConfig
    from tests.conftest import make_model

    stack = MemoryStack(make_model("llama"), StackConfig(segment_len=8))
    old = {k.replace("gates.compressive", "gate"): v + 1.0 for k, v in stack.state_dict().items()}
    assert any(k.endswith("memstack_memory.gate") for k in old)
    missing, unexpected = stack.load_state_dict(old, strict=False)
    assert not missing and not unexpected
    for gate in stack.gate_parameters():
        assert torch.equal(gate, torch.ones_like(gate))  # gate_init 0 + 1


def test_feature_map_gradient_is_elu_plus_one_derivative():
    # The custom backward reads sigma(x) only: against autograd of the plain formula, and gradcheck.
    from memstack.memory.compressive import feature_map

    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad((feature_map(x) * torch.arange(7.0, dtype=torch.float64)).sum(), x)
    (ref,) = torch.autograd.grad(((F.elu(x) + 1) * torch.arange(7.0, dtype=torch.float64)).sum(), x)
    torch.testing.assert_close(g, ref)
    assert torch.autograd.gradcheck(feature_map, (x,))


def test_retrieve_gradients_equal_autograd_of_the_formula():
    # _Retrieve recomputes sigma(q) and the numerator in backward: its gradients for q, M and z
    # must be autograd's of eq. (3) written out, including rows whose denominator is clamped.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 3, generator=g, requires_grad=True)
    M = torch.randn(2, 2, 3, 6, generator=g, requires_grad=True)
    z = torch.rand(2, 2, 3, generator=g).requires_grad_()
    w = torch.randn(2, 4, 5, 6, generator=g)
    z_small = (z * torch.tensor([1.0, 0.0])[None, :, None]).detach().requires_grad_()
    for zz in (z, z_small):  # the second: KV head 1 has z = 0, the denominator clamp holds
        got = torch.autograd.grad((retrieve(CompressiveState(M, zz), q) * w).sum(), (q, M, zz))
        sq = (F.elu(q) + 1).view(2, 2, 2, 5, 3)
        num = torch.einsum("bhgtk,bhkv->bhgtv", sq, M)
        den = torch.einsum("bhgtk,bhk->bhgt", sq, zz)[..., None].clamp_min(1e-6)
        ref = torch.autograd.grad(((num / den).reshape(2, 4, 5, 6) * w).sum(), (q, M, zz))
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
