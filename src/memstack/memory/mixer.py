"""The per-layer mixer: the learned gates over the sources of a layer's attention output.

Infini-attention, eq. (6) (https://arxiv.org/abs/2404.07143):
``A = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_local``, one scalar beta per query head.
With several gated sources the mixes nest in a fixed order (local, then each kind in the order
given), so with a single source this is exactly eq. (6). A row and head whose memory is still
empty keeps the running output exactly: a first segment equals the unwrapped model.
"""

from __future__ import annotations

import torch
from torch import nn

from memstack.memory.base import Readout


class MemoryMixer(nn.Module):
    """Gates of one attention layer, one float32 logit per query head and gated kind.

    Attached to the model's attention module as ``memstack_memory`` (so its parameters are the
    model's), named ``gates.<kind>``.

    Args:
        num_heads: query heads of the layer.
        kinds: ``{kind: initial beta}`` of the gated kinds of this layer, in mixing order
            (sigmoid(0) = 0.5 is the paper's equal mix).
    """

    def __init__(self, num_heads: int, kinds: dict[str, float]):
        super().__init__()
        # float32 whatever the model's dtype: the gate is a tiny, sensitive parameter.
        self.gates = nn.ParameterDict(
            {
                k: nn.Parameter(torch.full((num_heads,), float(v), dtype=torch.float32))
                for k, v in kinds.items()
            }
        )

    def mix(self, local: torch.Tensor, readouts: dict[str, Readout]) -> torch.Tensor:
        """Mix each kind's readout into ``local`` ``(B, T, H, d_v)``; returns ``local``'s dtype."""
        if not readouts:
            return local
        with torch.autocast(device_type=local.device.type, enabled=False):
            out = local.float()
            for kind, gate in self.gates.items():
                if kind not in readouts or readouts[kind].output is None:
                    continue
                readout = readouts[kind]
                g = torch.sigmoid(gate.float())[:, None]  # (H, 1)
                # a readout computed under autocast may be bf16: the mix is float32 either way
                mixed = torch.lerp(out, readout.output.float(), g)  # g * memory + (1 - g) * out
                if readout.empty is not None:  # (B, H) per row and head, or (B, T, H) per query too
                    empty = readout.empty[:, None] if readout.empty.ndim == 2 else readout.empty
                    mixed = torch.where(empty[..., None], out, mixed)
                out = mixed
        return out.to(local.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints of memstack <= 0.1 named the compressive gate ``memstack_memory.gate``.
        legacy = prefix + "gate"
        if legacy in state_dict and prefix + "gates.compressive" not in state_dict:
            state_dict[prefix + "gates.compressive"] = state_dict.pop(legacy)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"heads={next(iter(self.gates.values())).numel() if self.gates else 0}, kinds={list(self.gates)}"
        )
