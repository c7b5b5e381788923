"""Modules of earlier layouts: importing one fails with the name of its new home.

A meta-path finder that answers only for the old names below (nothing else is looked up here).
"""

from __future__ import annotations

import importlib.abc
import sys

MOVED = {
    "memstack.checks": "memstack.stack (MemoryStack)",
    "memstack.compat": "memstack.evals.compat",
    "memstack.config_fields": "memstack.fields",
    "memstack.data.retrieval_tasks": "memstack.evals.retrieval_tasks",
    "memstack.discovery": "memstack.model.discovery",
    "memstack.generation": "memstack.stack (MemoryStack.step / generate)",
    "memstack.memory.chunks": "memstack.memory.store.chunks",
    "memstack.memory.keys": "memstack.memory.store.keys",
    "memstack.memory.kv_pages": "memstack.memory.store.kv_pages",
    "memstack.memory.longterm": "memstack.memory.store.kind",
    "memstack.memory.sleep": "memstack.sleep",
    "memstack.memory.sleep_data": "memstack.sleep.data",
    "memstack.memory.sleep_losses": "memstack.sleep.losses",
    "memstack.memory.store_files": "memstack.memory.store.chunk_store",
    "memstack.memory.store_index": "memstack.memory.store.index",
    "memstack.memory.window": "memstack.model.window",
    "memstack.parameters": "memstack.stack (MemoryStack.param_groups)",
    "memstack.persistence": "memstack.saving",
    "memstack.policy": "memstack.memory.store.policy",
    "memstack.retrieval_bench": "memstack.evals.retrieval",
    "memstack.rotary": "memstack.model.rotary",
    "memstack.stack_config": "memstack.config",
    "memstack.switches": "memstack.stack (MemoryStack.memory_off)",
    "memstack.zoo": "memstack.evals.zoo",
}
"""Old module -> where its contents live now."""


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            raise ModuleNotFoundError(f"{fullname} moved: use {MOVED[fullname]}", name=fullname)
        return None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
