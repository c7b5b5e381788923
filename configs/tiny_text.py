"""Byte-level language model on a text file, with compressive memory (CPU, minutes).

    python scripts/train.py configs/tiny_text.py data.path=../shared/data/kjv.txt
    python scripts/eval_ppl.py runs/tiny_text --data ../shared/data/kjv.txt --doc-len 16384

Each book of the KJV is one document (``doc_separator`` splits the file where a chapter 1 starts);
training sequences are 2K bytes, 8 segments of 256.
"""

from memstack.config import CompressiveConfig, StackConfig
from memstack.data.text import KJV_BOOK_SEPARATOR
from memstack.train.config import Config, DataConfig, ModelConfig, OptimConfig, RunConfig, ScheduleConfig

config = Config(
    model=ModelConfig(arch="llama", hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4),
    data=DataConfig(
        task="text", path="../shared/data/kjv.txt", seq_len=2048, doc_separator=KJV_BOOK_SEPARATOR
    ),
    stack=StackConfig(segment_len=256, compressive=CompressiveConfig(update_rule="delta", gate_init=0.0)),
    optim=OptimConfig(lr=2e-3, weight_decay=0.1, gate_lr_mult=10.0),
    schedule=ScheduleConfig(max_steps=500, warmup_steps=50),
    run=RunConfig(out_dir="runs/tiny_text", batch_size=8, log_every=10, ckpt_every=250),
)
