"""Byte-level tiny Llama with compressive memory, trained on pass-key retrieval on 2 CPU cores.

A naive recipe (1M parameters, 512-byte prompts, loss = LM + 5 x answer) stays at chance: the
model never forms the induction heads the pass key is copied with. So this one goes in stages:

1. ``copy_steps``: repeated random strings only, so induction heads can start to form;
2. pass keys with 128-byte prompts: the prompt fills the first segment and the 6 answer bytes
   (" NNNNN") fall in the second, so the digits have to come back through compressive memory
   from the very first pass-key step, over a single segment boundary;
3. 256 and 512 bytes, then 1024 (the training length): the needle sits up to 7 segments before
   the answer.

A quarter of each pass-key batch stays repeated strings, so the copy circuit is kept. Evaluated
at 1x, 4x, 16x and 32x the training length, with memory on and off.

    python scripts/train.py configs/tiny_passkey.py
    python scripts/train.py configs/tiny_passkey.py stack.compressive=false \
        run.out_dir=runs/tiny_passkey_nomem
"""

from memstack.config import (
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    StackConfig,
)

config = Config(
    model=ModelConfig(arch="llama", hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4),
    data=DataConfig(
        task="passkey",
        seq_len=1024,
        copy_steps=700,
        curriculum=[128, 256, 512],
        curriculum_steps=300,
        answer_weight=5.0,
        repeat_fraction=0.25,
    ),
    stack=StackConfig(segment_len=128, update_rule="delta", gate_init=0.0),
    optim=OptimConfig(lr=3e-3, weight_decay=0.01, gate_lr_mult=10.0),
    schedule=ScheduleConfig(max_steps=1900, warmup_steps=50),
    run=RunConfig(out_dir="runs/tiny_passkey", batch_size=16, log_every=10, ckpt_every=100),
    eval=EvalConfig(
        passkey_lengths=[1024, 4096, 16384, 32768],
        passkey_depths=[0.0, 0.25, 0.5, 0.75, 1.0],
        samples_per_cell=5,
    ),
)
