"""Every rotary layout against the formula of the model that uses it, written here from its
modeling code, and the inverse against the forward."""

import pytest
import torch

from memstack.model.rotary import LAYOUTS, RotaryLayout, RotaryTables, Rotation


def angles(t: int, pairs: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, t, pairs, generator=g) * 6.0  # (1, T, R/2): one angle per pair


def llama(x, theta):  # modeling_llama: cos/sin = cat(freqs, freqs); x cos + rotate_half(x) sin
    cos, sin = torch.cat([theta.cos()] * 2, -1)[:, None], torch.cat([theta.sin()] * 2, -1)[:, None]
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def gptj(x, theta):  # modeling_gptj / cohere: cos, sin repeat_interleave(2); rotate_every_two
    cos = theta.cos().repeat_interleave(2, -1)[:, None]
    sin = theta.sin().repeat_interleave(2, -1)[:, None]
    every_two = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return x * cos + every_two * sin


def gpt_oss(x, theta):  # modeling_gpt_oss._apply_rotary_emb: cos/sin of width D/2, halves
    cos, sin = theta.cos()[:, None], theta.sin()[:, None]
    x1, x2 = x.chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def deepseek(x, theta):  # modeling_deepseek_v3.apply_rotary_pos_emb_interleave
    b, h, t, d = x.shape
    x = x.view(b, h, t, d // 2, 2).transpose(4, 3).reshape(b, h, t, d)
    return llama(x, theta)


def partial(fn, x, theta, trailing=False):  # GPT-NeoX / Phi: only part of the head is rotated
    r = 2 * theta.shape[-1]
    if trailing:  # DeepSeek MLA: [no-position part, rotated part]
        return torch.cat([x[..., :-r], fn(x[..., -r:], theta)], -1)
    return torch.cat([fn(x[..., :r], theta), x[..., r:]], -1)


CASES = [
    (
        RotaryLayout("half"),
        llama,
        lambda th: torch.cat([th.cos()] * 2, -1),
        lambda th: torch.cat([th.sin()] * 2, -1),
    ),
    (
        RotaryLayout("pairs"),
        gptj,
        lambda th: th.cos().repeat_interleave(2, -1),
        lambda th: th.sin().repeat_interleave(2, -1),
    ),
    (
        RotaryLayout("pairs_halfcos"),  # GLM hands the Llama-style cos/sin and interleaves their first half
        gptj,
        lambda th: torch.cat([th.cos()] * 2, -1),
        lambda th: torch.cat([th.sin()] * 2, -1),
    ),
    (RotaryLayout("half_halfwidth"), gpt_oss, lambda th: th.cos(), lambda th: th.sin()),
    (RotaryLayout("pairs_halfwidth"), gptj, lambda th: th.cos(), lambda th: th.sin()),
    (
        RotaryLayout("deinterleaved"),
        deepseek,
        lambda th: torch.cat([th.cos()] * 2, -1),
        lambda th: torch.cat([th.sin()] * 2, -1),
    ),
]


@pytest.mark.parametrize("trailing", [False, True])
@pytest.mark.parametrize("width", [16, 8])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0].style)
def test_rotation_matches_the_models_formula_and_inverts(case, width, trailing):
    layout, formula, cos_of, sin_of = case
    layout = RotaryLayout(layout.style, trailing)
    x = torch.randn(2, 3, 7, 16)
    theta = angles(7, width // 2)
    rot = Rotation(cos_of(theta), sin_of(theta), layout, 16)
    expected = partial(formula, x, theta, trailing)
    torch.testing.assert_close(rot.rotate(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rot.unrotate(expected), x, atol=1e-5, rtol=1e-5)


def test_the_inverse_is_exact_when_cos_and_sin_carry_an_attention_scale():
    # YaRN / LongRoPE fold a factor s into cos and sin: rotation then scales by s, the inverse by 1/s.
    theta, s = angles(5, 4), 1.37
    cos, sin = torch.cat([theta.cos()] * 2, -1) * s, torch.cat([theta.sin()] * 2, -1) * s
    x = torch.randn(1, 2, 5, 8)
    rotated = s * llama(x, theta)
    torch.testing.assert_close(
        Rotation(cos, sin, RotaryLayout("half"), 8).unrotate(rotated), x, atol=1e-5, rtol=1e-5
    )


def test_layouts_are_distinct():
    # If two layouts read the same position embeddings the same way, discovery could not tell
    # models apart by probing. Angles differ in every column, so no two readings coincide,
    # except leading and trailing spans that cover the whole head.
    raw = (torch.rand(1, 4, 8) * 6).cos(), (torch.rand(1, 4, 8) * 6).sin()
    x = torch.randn(1, 1, 4, 16)
    outs, widths = [], []
    for layout in LAYOUTS:
        cos, sin = layout.cos_sin(raw)
        outs.append(Rotation(cos, sin, layout, 16).rotate(x))
        widths.append(layout.table(cos).shape[-1])
    for i in range(len(outs)):
        for j in range(i):
            a, b = LAYOUTS[i], LAYOUTS[j]
            whole_head = widths[i] == widths[j] == 16 and a.trailing != b.trailing
            if whole_head and (a.style, a.sin_first, a.negated) == (b.style, b.sin_first, b.negated):
                continue
            assert (outs[i] - outs[j]).abs().max() > 1e-2, (a, b)


def test_tables_cache_per_positions_and_rotate_at_any_start():
    class Rope(torch.nn.Module):
        calls = 0

        def forward(self, x, position_ids):
            Rope.calls += 1
            theta = position_ids[..., None].float() * torch.tensor([1.0, 0.1])
            return torch.cat([theta.cos()] * 2, -1), torch.cat([theta.sin()] * 2, -1)

    from memstack.model.rotary import RotarySource

    tables = RotaryTables({0: RotarySource(Rope()), 1: None})
    x = torch.randn(1, 2, 3, 4)
    a = tables.rotation(0, 5, 3, 4, x.device)
    assert tables.rotation(0, 5, 3, 4, x.device) is a and Rope.calls == 1
    assert tables.rotation(1, 5, 3, 4, x.device) is None and tables.rotate_fn(1) is None
    theta = torch.arange(5, 8).float()[None, :, None] * torch.tensor([1.0, 0.1])
    torch.testing.assert_close(tables.rotate_fn(0)(x, 5), llama(x, theta), atol=1e-5, rtol=1e-5)
    same = tables.rotate_fn(0)(x, 9, step=0)  # every token at position 9
    theta9 = torch.full((1, 3, 1), 9.0) * torch.tensor([1.0, 0.1])
    torch.testing.assert_close(same, llama(x, theta9), atol=1e-5, rtol=1e-5)
