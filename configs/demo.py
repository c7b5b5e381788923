"""The README's demo: a minute of the tiny pass-key recipe on a CPU with three memory layers
(working memory, compressive memory, the long-term store), then the pass-key table with memory on
and off. Far too short to solve the task (the trained figures are in docs/results.md); it shows the
whole path a real run takes.

    python scripts/train.py configs/demo.py
"""

from memstack.config import CompressiveConfig, StackConfig, StoreConfig
from memstack.train.config import (
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
)

config = Config(
    model=ModelConfig(arch="llama", hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4),
    data=DataConfig(task="passkey", seq_len=256, copy_steps=100, curriculum=[128], curriculum_steps=50),
    stack=StackConfig(
        segment_len=128,
        compressive=CompressiveConfig(update_rule="delta"),
        store=StoreConfig(layers="1", chunk_len=32, block_len=32, top_k=4),
    ),
    optim=OptimConfig(lr=3e-3, weight_decay=0.01, gate_lr_mult=10.0),
    schedule=ScheduleConfig(max_steps=200, warmup_steps=20),
    run=RunConfig(out_dir="runs/demo", batch_size=16, log_every=10, ckpt_every=0),
    eval=EvalConfig(passkey_lengths=[256, 1024], passkey_depths=[0.0, 0.5, 1.0], samples_per_cell=4),
)
