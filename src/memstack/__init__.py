"""memstack: four layers of memory around any Hugging Face causal LM.

from memstack import MemoryStack, StackConfig
stack = MemoryStack(model, StackConfig(segment_len=512))
out = stack(input_ids, labels=input_ids)
"""

from .attention import ATTENTION_NAME, SegmentContext, SegmentInputs
from .config import CompressiveConfig, SleepConfig, StackConfig, StoreConfig
from .discovery import Architecture, UnsupportedModelError, discover
from .memory.base import LayerRecord, MemoryKind, Readout
from .memory.compressive import Compressive, CompressiveState
from .memory.mixer import MemoryMixer
from .memory.sleep import SleepReport
from .stack import KINDS, MemoryStack, StackOutput
from .state import StackState

__all__ = [
    "ATTENTION_NAME",
    "Architecture",
    "KINDS",
    "Compressive",
    "CompressiveConfig",
    "CompressiveState",
    "LayerRecord",
    "MemoryKind",
    "MemoryMixer",
    "MemoryStack",
    "Readout",
    "SegmentContext",
    "SegmentInputs",
    "SleepConfig",
    "SleepReport",
    "StackConfig",
    "StoreConfig",
    "StackOutput",
    "StackState",
    "UnsupportedModelError",
    "discover",
]
__version__ = "0.1.0"
