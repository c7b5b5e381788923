"""Layer 4, conceptual memory: sleep consolidates the long-term store into LoRA adapters.

A procedure run over a whole stack, above it (the stack never imports it)::

    from memstack.sleep import SleepConfig, sleep
    report = sleep(stack, SleepConfig(steps=200, replay_ratio=0.2, kl_weight=1.0), replay=windows)

:mod:`~memstack.sleep.consolidate` (the night), :mod:`~memstack.sleep.data` (documents, windows,
replay the base writes itself, the training day), :mod:`~memstack.sleep.losses` (KL terms); the
adapters themselves are the stack's (:mod:`memstack.memory.adapters`).
"""

from memstack.sleep.config import SleepConfig
from memstack.sleep.consolidate import SleepReport, mean_nll, sleep
from memstack.sleep.data import Day, generated_windows, night_documents, text_windows, windows

__all__ = [
    "Day",
    "SleepConfig",
    "SleepReport",
    "generated_windows",
    "mean_nll",
    "night_documents",
    "sleep",
    "text_windows",
    "windows",
]
