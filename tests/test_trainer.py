"""transformers.Trainer trains a MemoryStack as it is: outputs like transformers' own, the same
steps as memstack's fit, checkpoints that keep the gates and load back."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from memstack import MemoryStack
from memstack.config import CompressiveConfig, StackConfig
from memstack.train.batches import make_batches
from memstack.train.config import Config, DataConfig, ModelConfig, OptimConfig, RunConfig, ScheduleConfig
from memstack.train.loop import build_model, build_stack, fit, lr_lambda

TEXT = "The cat sat on the mat. The dog lay on the rug. A bird sang in the tree.\n" * 40
STEPS = 4


def tiny_config(tmp_path, tied: bool = False) -> Config:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return Config(
        model=ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2),
        data=DataConfig(task="text", path=str(path), seq_len=48),
        stack=StackConfig(segment_len=16, compressive=CompressiveConfig(gate_init=0.0)),
        optim=OptimConfig(lr=5e-3, weight_decay=0.1, grad_clip=0.5),
        schedule=ScheduleConfig(max_steps=STEPS, warmup_steps=2),
        run=RunConfig(out_dir=str(tmp_path / "fit"), batch_size=4, log_every=1, ckpt_every=0),
    )


class Rows(torch.utils.data.IterableDataset):
    """The rows of fit's batches, in fit's order: Trainer's batches of ``batch_size`` rows are
    then exactly fit's batches (an iterable dataset is never shuffled)."""

    def __init__(self, batches, steps: int):
        self.batches, self.steps = batches, steps

    def __iter__(self):
        for step in range(self.steps):
            batch = self.batches.batch(step, 0, 0, 1)
            for i in range(len(batch["input_ids"])):
                yield {"input_ids": batch["input_ids"][i], "labels": batch["labels"][i]}


def trainer_for(stack, config: Config, batches, out_dir, **args) -> Trainer:
    """Trainer with memstack's optimiser (the gates' own learning rate) and schedule."""
    o, s = config.optim, config.schedule
    optimizer = torch.optim.AdamW(stack.param_groups(o.lr, o.weight_decay, o.gate_lr_mult), betas=o.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, s.warmup_steps, s.max_steps, s.min_lr_ratio)
    )
    arguments = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=s.max_steps,
        per_device_train_batch_size=config.run.batch_size,
        max_grad_norm=o.grad_clip,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        **{"save_strategy": "no", **args},
    )
    return Trainer(
        model=stack,
        args=arguments,
        train_dataset=Rows(batches, s.max_steps),
        optimizers=(optimizer, scheduler),
    )


def test_stack_output_reads_like_a_transformers_output():
    """Attribute, key and index access name the same tensors, loss first; without labels the
    loss is absent from the key and index views; the loss by segment is the mean token loss of
    each segment's predictions, computed here from the logits."""
    torch.manual_seed(0)
    model = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    stack = build_stack(Config(model=model))
    stack.config.segment_len = 8
    ids = torch.randint(256, (2, 20))
    labels = ids.clone()
    labels[0, 5] = -100
    out = stack(ids, labels=labels)
    assert out["loss"] is out.loss and out[0] is out.loss and out[1] is out.logits
    assert list(out.keys())[:2] == ["loss", "logits"]
    bare = stack(ids)
    assert "loss" not in bare.keys() and bare[0] is bare.logits and bare.segment_loss is None
    # position t predicts label t + 1; a segment's predictions are its positions
    target = F.pad(labels[:, 1:], (0, 1), value=-100)
    nll = F.cross_entropy(out.logits.transpose(1, 2), target, reduction="none", ignore_index=-100)
    counted = target != -100
    expected = [nll[:, a : a + 8][counted[:, a : a + 8]].mean() for a in range(0, 20, 8)]
    torch.testing.assert_close(out.segment_loss, torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert out.num_tokens == int(counted.sum())
    torch.testing.assert_close(out.loss, nll[counted].mean(), rtol=1e-5, atol=1e-5)


def test_trainer_steps_equal_fit_steps(tmp_path):
    """The same batches, optimiser (gates at their own learning rate), schedule and clipping:
    Trainer's steps and memstack's fit give the same losses and the same final weights."""
    config = tiny_config(tmp_path)
    _, batches = make_batches(config)
    torch.manual_seed(0)
    ours = build_stack(config)
    theirs = build_stack(config)
    theirs.load_state_dict(ours.state_dict())
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    fit(ours, config, batches, progress=False)
    trainer = trainer_for(theirs, config, batches, tmp_path / "trainer")
    trainer.train()
    fit_losses = [json.loads(line)["loss"] for line in open(tmp_path / "fit" / "metrics.jsonl")]
    trainer_losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(fit_losses) == len(trainer_losses) == STEPS
    assert trainer_losses == pytest.approx(fit_losses, abs=1e-4)  # Trainer rounds its logs to 4 places
    assert fit_losses[-1] < fit_losses[0]
    moved = 0
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved += "memstack_memory" in name and not torch.equal(a, start[name])
    assert moved == 2  # both layers' gates trained, at the gates' learning rate, in both
    # evaluation gathers the logits only (StackConfig.keys_to_ignore_at_inference) and its loss
    # is the stack's own on the same batch
    batch = batches.batch(STEPS, 0, 0, 1)
    rows = [{"input_ids": batch["input_ids"][i], "labels": batch["labels"][i]} for i in range(4)]
    metrics = trainer.evaluate(eval_dataset=rows)
    theirs.eval()
    with torch.no_grad():
        expected = theirs(batch["input_ids"], labels=batch["labels"]).loss
    assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)
    prediction = trainer.predict(rows)
    assert prediction.predictions.shape == (4, 48, 256)  # the logits, nothing else


def test_trainer_checkpoint_keeps_the_gates_and_loads_back(tmp_path):
    """A model with tied embeddings (safetensors refuses a tensor under two names): Trainer's
    checkpoint holds every gate as trained; a fresh stack loads it exactly (strict), resuming
    from it ends where an uninterrupted run ends, and the stack's own files saved beside
    Trainer's restore the gates into the checkpoint's model."""
    config = tiny_config(tmp_path)
    _, batches = make_batches(config)

    def tied_stack(seed: int) -> MemoryStack:
        torch.manual_seed(seed)
        stack = build_stack(dataclasses.replace(config, run=dataclasses.replace(config.run, seed=seed)))
        stack.model.config.tie_word_embeddings = True
        stack.model.tie_weights()
        assert stack.model.lm_head.weight is stack.model.model.embed_tokens.weight
        return stack

    whole = tied_stack(0)
    start = {k: v.clone() for k, v in whole.state_dict().items()}
    trainer_for(whole, config, batches, tmp_path / "whole").train()

    half = tied_stack(0)
    half.load_state_dict(start)
    trainer = trainer_for(half, config, batches, tmp_path / "half", save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = tmp_path / "half" / "checkpoint-2"
    saved = load_file(str(checkpoint / "model.safetensors"))
    gates = {n for n in start if "memstack_memory" in n}
    assert gates and gates <= set(saved) and "model.lm_head.weight" not in saved
    assert any(not torch.equal(saved[g], start[g]) for g in gates)  # trained, and kept

    fresh = tied_stack(1)
    fresh.load_state_dict(saved)  # strict: the tied head is filled in from the embedding
    loaded = fresh.state_dict()
    assert all(torch.equal(loaded[name], saved[name]) for name in saved)
    assert fresh.model.lm_head.weight is fresh.model.model.embed_tokens.weight

    resumed = tied_stack(1)
    trainer_for(resumed, config, batches, tmp_path / "half").train(resume_from_checkpoint=str(checkpoint))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)

    trainer.save_model(str(tmp_path / "final"))
    half.save_pretrained(tmp_path / "final")  # the stack's own files, beside Trainer's
    reloaded = MemoryStack.from_pretrained(tmp_path / "final", build_model(config.model, 2))
    assert reloaded.named_gates().keys() == half.named_gates().keys()
    for key, gate in half.named_gates().items():
        assert torch.equal(reloaded.named_gates()[key], gate)
