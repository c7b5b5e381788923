"""tiny_passkey with three memory layers: working memory, compressive memory and
the long-term store, trained together on pass keys in synthetic and real-text filler.

The recipe is ``tiny_passkey.py`` (copy warm-up, a length curriculum to 1024 bytes, answers
anywhere in a 128-byte segment) with two changes:

- the long-term store on layers 1 and 3: 32-byte chunks keyed by the tokens that received the
  most attention (``received_attention``, InfLLM's representative tokens), 4 chunks retrieved per
  32-query block and read back in the local softmax (``kv``), every retrieved key at one fixed
  distance (the segment length);
- half the pass-key batches hide the needle in real English (the King James Bible's training
  split) instead of the repeated synthetic sentences, so retrieval, not the filler, is learned.

    python scripts/train.py configs/tiny_passkey_store.py
    python scripts/eval_passkey.py runs/tiny_passkey_store --filler both          # store on
    python scripts/eval_passkey.py runs/tiny_passkey_store --filler both --set stack.store=none
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
        filler="mix",
    ),
    stack=StackConfig(
        segment_len=128,
        compressive=CompressiveConfig(update_rule="delta", gate_init=0.0),
        store=StoreConfig(layers="1,3", chunk_len=32, block_len=32, top_k=4, readout="kv"),
    ),
    optim=OptimConfig(lr=3e-3, weight_decay=0.01, gate_lr_mult=10.0),
    schedule=ScheduleConfig(max_steps=1650, warmup_steps=50),
    run=RunConfig(out_dir="runs/tiny_passkey_store", batch_size=16, log_every=10, ckpt_every=100),
    eval=EvalConfig(
        passkey_lengths=[960, 4032, 16320, 32704],
        passkey_depths=[0.0, 0.25, 0.5, 0.75, 1.0],
        samples_per_cell=20,
        filler="both",
    ),
)
