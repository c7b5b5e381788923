"""GPU recipe: pass-key fine-tuning at 5K tokens for 400 steps (the Infini-attention paper's
setting), then evaluation up to 1M tokens.

    python scripts/train.py configs/llama_passkey_finetune.py model.path=/models/Llama-3.2-1B
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
    model=ModelConfig(path="/models/Llama-3.2-1B", dtype="bfloat16"),
    data=DataConfig(
        task="passkey", tokenizer="/models/Llama-3.2-1B", seq_len=5120, instruction=True, answer_weight=1.0
    ),
    stack=StackConfig(
        segment_len=2048,
        compressive=CompressiveConfig(update_rule="delta", gate_init=-3.0),
        checkpoint_segments=True,
    ),
    optim=OptimConfig(lr=2e-5, weight_decay=0.0, gate_lr_mult=100.0),
    schedule=ScheduleConfig(max_steps=400, warmup_steps=20),
    run=RunConfig(out_dir="runs/llama_passkey_finetune", batch_size=8, log_every=10, ckpt_every=100),
    eval=EvalConfig(passkey_lengths=[32768, 131072, 1048576], samples_per_cell=20, filler="both"),
)
