"""The consolidation experiment's base: a tiny stack with all memory layers, pretrained briefly
on pass keys in real text (the King James Bible's training split), plus the sleep recipe.

    python scripts/train.py configs/tiny_sleep.py              # ~10 min on 2 CPU cores
    python scripts/eval_sleep.py runs/tiny_sleep               # nights x variants (memory/sleep.py)

Pass keys teach the tiny model to read text and copy digits; the facts of the experiment ("Ada's
code is 48213.") are new to it and, read once by day, must come back closed-book after sleep.
The ``sleep`` section is the recipe every sleeping variant of ``eval_sleep.py`` starts from
(override with ``--set sleep.steps=...``).
"""

from memstack.config import CompressiveConfig, StackConfig, StoreConfig
from memstack.sleep import SleepConfig
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
    model=ModelConfig(arch="llama", hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4),
    data=DataConfig(
        task="passkey",
        seq_len=512,
        copy_steps=150,
        curriculum=[128, 256, 384],
        curriculum_steps=50,
        answer_weight=5.0,
        repeat_fraction=0.25,
        filler="text",
    ),
    stack=StackConfig(
        segment_len=128,
        compressive=CompressiveConfig(update_rule="delta", gate_init=0.0),
        store=StoreConfig(layers="1", chunk_len=32, block_len=32, top_k=4, readout="kv"),
    ),
    optim=OptimConfig(lr=3e-3, weight_decay=0.01, gate_lr_mult=10.0),
    schedule=ScheduleConfig(max_steps=500, warmup_steps=50),
    run=RunConfig(out_dir="runs/tiny_sleep", batch_size=16, log_every=10, ckpt_every=100),
    eval=EvalConfig(
        passkey_lengths=[480, 960], passkey_depths=[0.0, 0.5, 1.0], samples_per_cell=4, filler="text"
    ),
    sleep=SleepConfig(
        rank=16,
        alpha=32.0,
        target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        steps=200,
        lr=3e-3,
        batch_size=8,
        rehearsal=0.0,  # the recipe docs/results.md's tiny sleep tables were measured with
    ),
)
