"""GPU recipe: continual pre-training of a local Llama-family checkpoint with compressive memory,
following Infini-attention (segment 2048, 32K-token inputs, BPTT across all 16 segments).

    torchrun --nproc_per_node 8 scripts/train.py configs/llama_continual.py \
        model.path=/models/Llama-3.2-1B data.path=/data/pg19

The base model's weights start as they are; gates start at -3 (5% memory) so the first steps
behave like the original model, and learn 100x faster than the rest (no weight decay).
"""

from memstack.config import CompressiveConfig, StackConfig
from memstack.train.config import Config, DataConfig, ModelConfig, OptimConfig, RunConfig, ScheduleConfig

config = Config(
    model=ModelConfig(path="/models/Llama-3.2-1B", dtype="bfloat16"),
    data=DataConfig(task="text", path="/data/pg19", tokenizer="/models/Llama-3.2-1B", seq_len=32768),
    stack=StackConfig(
        segment_len=2048,
        compressive=CompressiveConfig(update_rule="delta", gate_init=-3.0),
        checkpoint_segments=True,
    ),
    optim=OptimConfig(lr=1e-5, weight_decay=0.1, gate_lr_mult=100.0, grad_accum=4),
    schedule=ScheduleConfig(max_steps=30000, warmup_steps=500),
    run=RunConfig(out_dir="runs/llama_continual", batch_size=1, log_every=10, ckpt_every=500),
)
