"""Train a MemoryStack from a config file.

    python scripts/train.py configs/tiny_passkey.py
    python scripts/train.py configs/tiny_passkey.py schedule.max_steps=50 run.out_dir=runs/try
    torchrun --nproc_per_node 2 scripts/train.py configs/tiny_text.py    # DDP

Overrides ``a.b=value`` are parsed to the field's type; an unknown key is an error that names the
closest valid ones, a bad value one that says what is accepted. The resolved config is saved as
``config.json`` in the run directory, metrics as ``metrics.jsonl`` (and to TensorBoard with
``run.tensorboard=true``, to W&B with ``run.wandb=online|offline``), checkpoints as
``step-NNNNNN/``. A passkey run ends with the evaluation table (memory on and off) in
``passkey.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from memstack.io import write_json
from memstack.train.batches import make_batches
from memstack.train.config import load_config
from memstack.train.dashboards import check_dashboards
from memstack.train.evaluate import format_passkey_table, passkey_accuracy
from memstack.train.loop import train


def summary_text(stack, config, result: dict) -> str:
    """What was trained, and pass-key accuracy with memory on against off, per length."""
    t = result["train"]
    lines = [
        f"\nmemstack: {t['step']} steps in {t['seconds']:.0f} s, final loss {t['loss']:.3f}",
        stack.describe(),
    ]
    for key, table in result.items():
        if not key.endswith("memory_on") or "by_length" not in table:
            continue
        off = result.get(key.replace("memory_on", "memory_off"))
        for i, row in enumerate(table["by_length"]):
            line = f"  pass key at {row['length']} tokens ({table.get('filler', 'synthetic')} filler): "
            line += f"memory on {100 * row['mean']:.0f}%"
            if off is not None:
                line += f", off {100 * off['by_length'][i]['mean']:.0f}%"
            lines.append(line + f" (n={row['n']})")
    lines.append(f"  outputs in {config.run.out_dir}/: config.json, metrics.jsonl, passkey.json, step-*/")
    lines.append("  trained figures, and the commands that reproduce them: docs/results.md")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a configs/*.py file")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    args = p.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        check_dashboards(config.run)  # a missing extra fails now, not after the model loads
        # the data too, before anything is trained: a missing data.path is a one-line error
        tokenizer, batches = make_batches(config)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    summary = train(config, batches)
    stack = summary.pop("stack")
    result = {"train": summary}
    sharded = config.run.fsdp and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if sharded and config.data.task == "passkey" and not args.no_eval and os.environ.get("RANK", "0") == "0":
        print("evaluation skipped under run.fsdp (the stack is sharded); evaluate the saved run with")
        print(f"python scripts/eval_passkey.py {config.run.out_dir}")
    elif config.data.task == "passkey" and not args.no_eval and os.environ.get("RANK", "0") == "0":
        e = config.eval
        stack.eval()
        fillers = ["synthetic", "text"] if e.filler == "both" else [e.filler]
        for filler in fillers:
            for on in [True, False] if e.memory_off else [True]:
                table = passkey_accuracy(
                    stack,
                    tokenizer,
                    e.passkey_lengths,
                    e.passkey_depths,
                    e.samples_per_cell,
                    seed=10_000,
                    use_memory=on,
                    instruction=config.data.instruction,
                    filler=filler,
                    filler_path=config.data.filler_path,
                )
                key = "memory_on" if on else "memory_off"
                result[key if len(fillers) == 1 else f"{filler}_{key}"] = table
                print(format_passkey_table(table))
        write_json(Path(config.run.out_dir) / "passkey.json", result)
    if os.environ.get("RANK", "0") == "0":
        print(summary_text(stack, config, result))
    print(json.dumps(result["train"]))
    return result


if __name__ == "__main__":
    main()
