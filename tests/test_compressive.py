"""Infini-attention formulas against naive loops over tokens and heads, written here from the
paper's equations (arXiv:2404.07143, eqs. 3-6), not from the code under test."""

import pytest
import torch
import torch.nn.functional as F

from memstack.memory.compressive import CompressiveMemory, CompressiveState, init_state, retrieve, update


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
    mem = CompressiveMemory(num_heads=4, gate_init=0.0)
    with torch.no_grad():
        mem.gate.copy_(torch.tensor([-2.0, -1.0, 1.0, 3.0]))
    q = torch.randn(2, 4, 5, 8)
    local = torch.randn(2, 5, 4, 6)
    M, z = random_state(2, 2, 8, 6)
    state = CompressiveState(M.float(), z.float())
    state = CompressiveState(state.M, state.z.clone())
    state.z[1] = 0  # row 1 has written nothing yet
    state.M[1] = 0
    out = mem.read(state, q, local)
    g = torch.sigmoid(mem.gate.detach().double())
    A_mem = naive_retrieve(M, z, q, 2).transpose(1, 2)  # (B, T, H, dv)
    expected0 = g[None, :, None] * A_mem[0] + (1 - g[None, :, None]) * local[0].double()
    torch.testing.assert_close(out[0].double(), expected0, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[1], local[1])


def test_state_is_float32_under_bf16_autocast():
    mem = CompressiveMemory(num_heads=2)
    state = init_state(1, 2, 4, 4, "cpu")
    k = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new = mem.write(state, k, k, None)
        out = mem.read(
            new, torch.randn(1, 2, 3, 4, dtype=torch.bfloat16), torch.randn(1, 3, 2, 4, dtype=torch.bfloat16)
        )
    assert new.M.dtype == torch.float32 and new.z.dtype == torch.float32
    assert out.dtype == torch.bfloat16
