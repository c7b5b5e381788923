"""The one-off driver behind levers_night1.jsonl: night 1 of scripts/eval_sleep_smollm2.py's
protocol (seed 0: the same 30 facts, day text, stack, recipe and probes, through the script's own
functions) for the levers given as JSON on the command line, e.g.

    python results/smollm2_sleep_120/levers.py '{}' '{"steps": 120}' '{"steps": 120, "aug": "paraphrases"}'

It also asks the stored phrasing with a leading space (" Talvo Quenning's locker number is"), as
the name's first token reads inside the day's text: "lead" against the script's "nolead".
"""

import copy
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import eval_sleep_smollm2 as E  # noqa: E402

from memstack import MemoryStack  # noqa: E402
from memstack.data.filler import filler_text  # noqa: E402
from memstack.evals.facts import STORED, day_text, greedy_hits, invent_facts, split_answer  # noqa: E402
from memstack.evals.longcontext import stack_config  # noqa: E402
from memstack.pretrained import smollm2  # noqa: E402
from memstack.sleep import mean_nll, sleep, text_windows  # noqa: E402
from memstack.train.evaluate import sample_seed  # noqa: E402

torch.set_num_threads(2)
torch.manual_seed(0)
model, tok = smollm2()
heads = json.loads((ROOT / "results" / "smollm2" / "heads.json").read_text())["heads"]
base = MemoryStack(model, stack_config(heads, 512)).eval()
words = filler_text("train").split(" ")
replay = text_windows(filler_text("train")[-400_000:], tok, 128, 256)
kjv = text_windows(filler_text("test"), tok, 256, 16)
facts = invent_facts(30, sample_seed("sleep-facts", 0))
rng = random.Random(sample_seed("sleep-day", 0))
day = day_text(facts, words, rng) + " " + " ".join(words[:64])


def stored(fact, lead: bool):
    prompt = STORED[fact.relation].split("{value}")[0].format(name=fact.name).rstrip()
    return split_answer(tok, (" " if lead else "") + prompt, fact.value)


for lever in [json.loads(a) for a in sys.argv[1:]]:
    aug = lever.pop("aug", None)
    t0 = time.perf_counter()
    stack = copy.deepcopy(base)
    stack.reset()
    E.read_day(stack, tok, day)
    cfg = dataclasses.replace(E.RECIPE, seed=0, **lever)
    augment = {None: None, "paraphrases": E.paraphrase_augment(tok)}[aug]
    report = sleep(stack, cfg, replay=replay, augment=augment, progress=False)
    run, pad = E.logits_off(stack), tok.pad_token_id or 0
    row = {
        **lever,
        "aug": aug,
        "nolead": sum(greedy_hits(run, [stored(f, False) for f in facts], pad_id=pad)),
        "lead": sum(greedy_hits(run, [stored(f, True) for f in facts], pad_id=pad)),
        "unseen": sum(greedy_hits(run, E.prompts(tok, facts)["unseen"], pad_id=pad)),
        "of": 30,
        "kjv": mean_nll(stack, kjv, None, 8),
        "night_after": report.night_loss_after,
        "sleep_s": report.seconds,
        "s": time.perf_counter() - t0,
    }
    print(json.dumps(row), flush=True)
