"""Byte-level tiny Llama with compressive memory, trained on pass-key retrieval on 2 CPU cores.

A naive recipe (1M parameters, 512-byte prompts, loss = LM + 5 x answer) stays at chance: the
model never forms the induction heads the pass key is copied with. So this one goes in stages:

1. ``copy_steps``: repeated random strings only, so induction heads can start to form;
2. pass keys whose prompts grow from 128 to 1024 bytes (the training length) in steps of 64
   bytes every 45 steps: the needle starts inside the current segment and moves up to 7
   segments back;
3. the training length, 1024 bytes, to the end.

Each batch's prompt is shortened by a random 0-127 bytes (``length_jitter``), so the answer
lands at every position of a 128-byte segment, with the question in local context. A quarter of
each pass-key batch stays repeated strings, so the copy circuit is kept. Evaluated at 1x, 4x, 16x
and 32x the training length, 64 bytes short of the segment grid (answer mid-segment); run
``scripts/eval_passkey.py`` with ``--lengths 1024 4096 ...`` for the grid, where the answer opens
a fresh segment and even the question must come back from memory.

    python scripts/train.py configs/tiny_passkey.py
    python scripts/train.py configs/tiny_passkey.py stack.compressive=false \
        run.out_dir=runs/tiny_passkey_nomem

For a full-attention baseline make the segment longer than prompt + answer
(``stack.segment_len=2048 stack.compressive=false``): with ``segment_len=1024`` a 1024-byte
prompt puts its answer in a second segment that sees nothing of the first.
"""

from memstack.config import CompressiveConfig, StackConfig
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
        seq_len=1024,
        copy_steps=600,
        curriculum=list(range(128, 1024, 64)),
        curriculum_steps=45,
        length_jitter=127,
        answer_weight=5.0,
        repeat_fraction=0.25,
    ),
    stack=StackConfig(segment_len=128, compressive=CompressiveConfig(update_rule="delta", gate_init=0.0)),
    optim=OptimConfig(lr=3e-3, weight_decay=0.01, gate_lr_mult=10.0),
    schedule=ScheduleConfig(max_steps=1650, warmup_steps=50),
    run=RunConfig(out_dir="runs/tiny_passkey", batch_size=16, log_every=10, ckpt_every=100),
    eval=EvalConfig(
        passkey_lengths=[960, 4032, 16320, 32704],
        passkey_depths=[0.0, 0.25, 0.5, 0.75, 1.0],
        samples_per_cell=20,
        filler="both",
    ),
)
