"""One night of sleep on a trained run: read text into the long-term store, consolidate it.

    python scripts/sleep.py runs/tiny_sleep --read notes.txt                  # read, then sleep
    python scripts/sleep.py runs/tiny_sleep --store runs/tiny_sleep/sleep/stores   # saved stores
    python scripts/sleep.py runs/tiny_sleep --read notes.txt --set sleep.objective=distill

The stack is the run's latest checkpoint (with the adapters of earlier nights if ``--from`` names
a directory this script wrote). ``--read`` streams a text file through the stack with every
memory on, segment by segment, so its chunks go into the store; ``--store`` instead loads stores
saved by an earlier call. Then ``memstack.sleep.sleep(stack)`` (memstack/sleep/consolidate.py)
trains a new adapter on the
records not yet consolidated, with the run's ``sleep`` section as the recipe (``--set sleep.*``
overrides it). Written to ``--out`` (default ``RUN/sleep``): the stack with every adapter
(``save_pretrained``), the report under ``sleep_reports/``, and the stores with their records
marked consolidated under ``stores/``. Replay and held-out windows, where used, come from the
training and test splits of the King James Bible in the repository's corpora/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from memstack.data.filler import filler_text
from memstack.memory.store.kind import load_stores, save_stores
from memstack.sleep import SleepConfig, sleep, text_windows
from memstack.state import StackState
from memstack.train.config import add_set_argument
from memstack.train.evaluate import load_run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--read", help="a text file to read into the store before sleeping")
    src.add_argument("--store", help="stores saved by an earlier call (its --out/stores)")
    p.add_argument("--from", dest="previous", help="a directory this script wrote: start from its adapters")
    p.add_argument("--out", default=None, help="where to write (default RUN_DIR/sleep)")
    p.add_argument("--held-out", type=int, default=16, help="held-out windows for the forgetting figure")
    add_set_argument(p)
    args = p.parse_args(argv)
    config, stack, tokenizer = load_run(args.run_dir, args.set)
    if "store" not in stack.kinds:
        raise SystemExit(
            "error: sleep consolidates the long-term store; this run has none (--set stack.store=on)"
        )
    if args.previous:
        stack.adapters.load(Path(args.previous) / "adapters")
    out = Path(args.out or Path(args.run_dir) / "sleep")
    seg = stack.config.segment_len
    if args.read:
        path = Path(args.read)
        if not path.is_file():
            raise SystemExit(f"error: --read {path}: no such file")
        ids = torch.tensor([tokenizer.encode(path.read_text())], device=stack.device)
        with torch.no_grad():
            for a in range(0, ids.shape[1], seg):
                stack.step(ids[:, a : a + seg])
        state = stack.state
    else:
        state = StackState(memories={"store": load_stores(args.store)})
    cfg = config.sleep or SleepConfig()
    replay = text_windows(filler_text("train"), tokenizer, seg, 256) if cfg.replay_ratio > 0 else None
    held_out = text_windows(filler_text("test"), tokenizer, seg, args.held_out)
    report = sleep(stack, cfg, state=state, replay=replay, held_out=held_out, directory=out)
    stack.save_pretrained(out)
    save_stores(state.memories["store"], out / "stores")
    print(json.dumps(report.to_dict(), indent=2))
    return report.to_dict()


if __name__ == "__main__":
    main()
