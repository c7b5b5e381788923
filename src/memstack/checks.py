"""Input and state checks of a MemoryStack: everything ``forward``, ``step`` and ``generate`` are
given is checked before any work is done, with a message that says what was expected.
"""

from __future__ import annotations

import torch

from memstack.state import StackState


class StackChecks:
    """The validation half of :class:`~memstack.stack.MemoryStack`: token ids against the model's
    vocabulary, and a state against this stack's kinds, layers, shapes and batch."""

    @property
    def vocab_size(self) -> int:
        """Rows of the model's input embedding: token ids must lie in ``[0, vocab_size)`` (the
        text config's vocabulary where the input embedding is not one table, as MusicGen's)."""
        embedding = self.model.get_input_embeddings()
        if isinstance(embedding, torch.nn.Embedding):
            return embedding.num_embeddings
        return int(self.model.config.get_text_config().vocab_size)

    def _check_ids(self, name: str, ids: torch.Tensor) -> None:
        """Shape, dtype and vocabulary range of token ids, before any work is done."""
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.ndim != 2:
            raise ValueError(f"{name} must be (batch, length), got shape {tuple(ids.shape)}")
        if ids.shape[0] < 1 or ids.shape[1] < 1:
            raise ValueError(f"{name} must hold at least one row and one token, got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"{name} must be integer token ids, got dtype {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{name} holds token id {bad}, outside the model's vocabulary [0, {self.vocab_size - 1}]"
            )

    def _check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None
    ) -> None:
        """``forward``'s inputs: token ids, and a mask and labels of the same shape."""
        self._check_ids("input_ids", input_ids)
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(
                    f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(t.shape)}"
                )

    def _memory_shape(self) -> tuple[int, int, int]:
        """(kv_heads, d_k, d_v) of this model's compressive memory (its first memory layer's)."""
        layers = self.memory_layers or self.arch.layers
        site = self.arch.sites[layers[0]]
        return site.kv_heads, site.key_dim, site.value_dim

    def _check_state(self, state: StackState, batch: int) -> None:
        """A state must come from this model and stack (its kinds, layers and shapes) and this batch."""
        if not isinstance(state, StackState):
            raise ValueError(f"state must be a StackState, got {type(state).__name__}")
        for name, layers in state.memories.items():
            own = sorted(self.kinds[name].layers) if name in self.kinds else []
            foreign = sorted(set(layers) - set(own))
            if foreign:
                raise ValueError(
                    f"state holds {name} memory for layers {foreign}, but this stack's {name} layers are "
                    f"{own}: it was made by another model or stack config"
                )
        for name, layers in state.others().items():
            for layer, s in layers.items():
                rows = getattr(s, "batch_size", batch)
                if rows != batch:
                    raise ValueError(
                        f"state's {name} memory of layer {layer} holds {rows} streams, the input has {batch} "
                        "rows; call reset() or pass a state made for the same batch"
                    )
        if state.batch_size is not None and state.batch_size != batch:
            raise ValueError(
                f"state batch size {state.batch_size} differs from the input's {batch} rows; call reset() "
                "or pass a state made for the same batch"
            )
        kv_heads, d_k, d_v = self._memory_shape()
        for layer, s in state.compressive.items():
            expected = (batch, kv_heads, d_k, d_v)
            if tuple(s.M.shape) != expected or tuple(s.z.shape) != expected[:3]:
                raise ValueError(
                    f"state of layer {layer} has M {tuple(s.M.shape)} and z {tuple(s.z.shape)}, but this "
                    f"model's memory is M {expected} (batch, kv_heads, d_k, d_v) and z {expected[:3]}: "
                    "the state was made by another model"
                )
