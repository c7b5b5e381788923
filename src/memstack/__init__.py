"""memstack: four layers of memory around any Hugging Face causal LM.

from memstack import MemoryStack, StackConfig
stack = MemoryStack(model, StackConfig(segment_len=512))
out = stack(input_ids, labels=input_ids)
"""

from memstack.attention import ATTENTION_NAME, SegmentContext, SegmentInputs
from memstack.config import CompressiveConfig, SleepConfig, StackConfig, StoreConfig
from memstack.memory.base import LayerRecord, MemoryKind, Readout
from memstack.memory.compressive import Compressive, CompressiveState
from memstack.memory.mixer import MemoryMixer
from memstack.model.discovery import Architecture, UnsupportedModelError, discover
from memstack.sleep.consolidate import SleepReport
from memstack.stack import KINDS, MemoryStack, StackOutput
from memstack.state import StackState

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
