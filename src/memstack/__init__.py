"""memstack: four layers of memory around any Hugging Face causal LM.

from memstack import MemoryStack, StackConfig
stack = MemoryStack(model, StackConfig(segment_len=512))
out = stack(input_ids, labels=input_ids)

The public API is what this module exports; :mod:`memstack.sleep` (layer 4, run above the stack),
:mod:`memstack.train` (the training script's loop and run config) and :mod:`memstack.evals`
(benchmarks, the compatibility checker) are imported on their own.
"""

from memstack._moved import install as _install_moved_modules
from memstack.attention import ATTENTION_NAME, SegmentContext, SegmentInputs
from memstack.config import StackConfig
from memstack.explain import Explanation
from memstack.memory.base import (
    KINDS,
    BuildContext,
    ClosedSegment,
    LayerRecord,
    MemoryKind,
    ReadContext,
    Readout,
    register_kind,
    unregister_kind,
)
from memstack.memory.carry import CarryConfig, CarryTokens
from memstack.memory.compressive import Compressive, CompressiveConfig, CompressiveState
from memstack.memory.mixer import MemoryMixer
from memstack.memory.store.keys import register_strategy
from memstack.memory.store.kind import LongTermMemory, StoreConfig, StoreState
from memstack.memory.store.readouts import StoreReadout, register_readout
from memstack.model.discovery import Architecture, UnsupportedModelError, discover
from memstack.stack import MemoryStack, StackOutput
from memstack.state import StackState

_install_moved_modules()

__all__ = [
    "ATTENTION_NAME",
    "Architecture",
    "CarryConfig",
    "CarryTokens",
    "BuildContext",
    "ClosedSegment",
    "Compressive",
    "CompressiveConfig",
    "CompressiveState",
    "Explanation",
    "KINDS",
    "LayerRecord",
    "LongTermMemory",
    "MemoryKind",
    "MemoryMixer",
    "MemoryStack",
    "ReadContext",
    "Readout",
    "SegmentContext",
    "SegmentInputs",
    "StackConfig",
    "StackOutput",
    "StackState",
    "StoreConfig",
    "StoreReadout",
    "StoreState",
    "UnsupportedModelError",
    "discover",
    "register_kind",
    "register_readout",
    "register_strategy",
    "unregister_kind",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Names that left the top-level API fail with their new home."""
    moved = {
        "SleepConfig": "from memstack.sleep import SleepConfig",
        "SleepReport": "from memstack.sleep import SleepReport",
    }
    if name in moved:
        raise ImportError(f"memstack.{name} moved: {moved[name]}")
    raise AttributeError(f"module 'memstack' has no attribute {name!r}")
