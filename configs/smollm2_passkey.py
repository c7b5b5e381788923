"""CPU recipe: teach SmolLM2-135M-Instruct to read its memory, in under an hour on 2 cores.

    python scripts/train.py configs/smollm2_passkey.py
    python scripts/eval_smollm2.py --run runs/smollm2_passkey --rows tuned tuned_off --lengths 4096 32768

What trains: LoRA adapters (peft, rank 16) on the attention's value and output projections, and
the compressive memory's gates; the 134.5M base weights stay frozen. The adapters leave the
query and key projections alone on purpose: the store is searched with the model's own queries
and keys at the calibrated retrieval heads (``results/smollm2/heads.json``), and training them
would move the search away from what the calibration measured.

What it trains on: pass-key prompts of exactly two segments (4,096 tokens), so the question ends
a segment and the answer opens the next one, as ``generate(close_prompt=True)`` answers in the
evaluation; the key lies in either segment, so the answer sees it only through memory (the
store's retrieved tokens, or compressive memory) or, at depth near 1, through the carried last
256 tokens. Half the prompts' filler is the papers' synthetic sentences, half real text (the
train split of the King James Bible), and the loss covers every token (language modelling on the
filler) plus 5x the answer's tokens: the plain text keeps the model's language while it learns
the task. The held-out loss before and after is measured by ``scripts/eval_smollm2.py --run ...
--heldout`` on the KJV's test split and on Python's language reference, which no recipe trains on.

The stack is the evaluation's ``store`` row (memstack.evals.longcontext.stack_config) plus
compressive memory on every layer (delta rule, gates from -3: 5% memory at first, so the first
steps behave like the model without it).
"""

import dataclasses

from memstack.evals.longcontext import stack_config
from memstack.memory.compressive import CompressiveConfig
from memstack.train.config import (
    Config,
    DataConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
)

HEADS = "18.6,18.7,20.3,21.8,22.4,23.1,23.2,23.7"
"""The retrieval heads ``scripts/eval_smollm2.py --calibrate`` chose (results/smollm2/heads.json)."""

config = Config(
    model=ModelConfig(path="smollm2"),
    data=DataConfig(
        task="passkey", tokenizer="smollm2", seq_len=4096, instruction=True, filler="mix", answer_weight=5.0
    ),
    stack=dataclasses.replace(
        stack_config(HEADS, segment_len=2048),
        compressive=CompressiveConfig(layers="all", update_rule="delta", gate_init=-3.0),
    ),
    lora=LoraConfig(rank=16, alpha=32.0, targets=["v_proj", "o_proj"]),
    optim=OptimConfig(lr=5e-4, weight_decay=0.0, gate_lr_mult=20.0),
    schedule=ScheduleConfig(max_steps=100, warmup_steps=5),
    run=RunConfig(out_dir="runs/smollm2_passkey", device="cpu", batch_size=1, log_every=5, ckpt_every=50),
    eval=EvalConfig(
        passkey_lengths=[4096], passkey_depths=[0.25, 0.75], samples_per_cell=2, memory_off=False
    ),
)
