"""Byte-level tiny Llama with compressive memory, trained on pass-key retrieval on 2 CPU cores.

A curriculum: first the whole prompt fits in one segment (the needle is read by local attention),
then prompts grow so the needle sits segments before the question and must come back through
memory. Evaluated up to 32x the training length.
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
        curriculum=[128, 256, 512],
        curriculum_steps=300,
        answer_weight=5.0,
        repeat_fraction=0.25,
    ),
    stack=StackConfig(segment_len=128, update_rule="delta", gate_init=0.0),
    optim=OptimConfig(lr=2e-3, weight_decay=0.01, gate_lr_mult=10.0),
    schedule=ScheduleConfig(max_steps=1500, warmup_steps=50),
    run=RunConfig(out_dir="runs/tiny_passkey", batch_size=16, log_every=10, ckpt_every=250),
    eval=EvalConfig(
        passkey_lengths=[1024, 4096, 16384, 32768],
        passkey_depths=[0.0, 0.25, 0.5, 0.75, 1.0],
        samples_per_cell=5,
    ),
)
