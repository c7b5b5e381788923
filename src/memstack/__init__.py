"""memstack: four layers of memory around any Hugging Face causal LM.

from memstack import MemoryStack, StackConfig
stack = MemoryStack(model, StackConfig(segment_len=512))
out = stack(input_ids, labels=input_ids)
"""

from .attention import ATTENTION_NAME, SegmentContext
from .config import StackConfig
from .families import FAMILIES, UnsupportedModelError
from .memory.compressive import CompressiveMemory, CompressiveState
from .stack import MemoryStack, StackOutput, StackState

__all__ = [
    "ATTENTION_NAME",
    "FAMILIES",
    "CompressiveMemory",
    "CompressiveState",
    "MemoryStack",
    "SegmentContext",
    "StackConfig",
    "StackOutput",
    "StackState",
    "UnsupportedModelError",
]
__version__ = "0.1.0"
