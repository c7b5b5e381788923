"""The learned parameters a MemoryStack adds to its model, and how to optimise them: the per-head
gate logits of every memory layer and gated kind, and AdamW parameter groups that set them apart.
"""

from __future__ import annotations

import torch
from torch import nn


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded DTensor (the tensor itself otherwise)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class StackParameters:
    """The training half of :class:`~memstack.stack.MemoryStack`: gates and parameter groups."""

    def named_gates(self) -> dict[tuple[int, str], nn.Parameter]:
        """``{(layer, kind): beta}``: the per-head gate logits of every memory layer and gated kind."""
        return {(layer, kind): g for layer, mixer in self._mixers.items() for kind, g in mixer.gates.items()}

    def gate_parameters(self) -> list[nn.Parameter]:
        """The per-head gate logits beta of every memory layer and gated kind."""
        return list(self.named_gates().values())

    def gate_values(self, kind: str = "compressive") -> dict[int, torch.Tensor]:
        """sigmoid(beta) per layer and head for one kind: the share of each head's output that comes
        from that memory. Under FSDP2 the gates are gathered from their shards: a collective that
        every rank must call."""
        return {
            layer: torch.sigmoid(_full(g.detach()).float()).cpu()
            for (layer, k), g in self.named_gates().items()
            if k == kind
        }

    def param_groups(self, lr: float, weight_decay: float = 0.0, gate_lr_mult: float = 100.0) -> list[dict]:
        """Optimizer parameter groups: gates apart, with their own learning rate and no decay.

        With a normal learning rate the gates barely move (about 0.03 over a whole run in public
        reproductions, every head stuck at 0.5), hence the multiplier. Matrices get weight decay;
        biases, norms and gates do not. Frozen parameters (``requires_grad=False``) are left out.

        Returns:
            Groups for ``torch.optim.AdamW``; each has a ``name`` ("decay", "no_decay", "gates").
        """
        gate_ids = {id(p) for p in self.gate_parameters()}
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad and id(p) not in gate_ids:
                (decay if p.ndim >= 2 else no_decay).append(p)
        gates = [p for p in self.gate_parameters() if p.requires_grad]
        groups = [
            {"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
            {"name": "gates", "params": gates, "lr": lr * gate_lr_mult, "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]
