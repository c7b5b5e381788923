"""The README's examples run as written and do what they say.

Every ```python block of README.md runs, in order, in one namespace (the first is the "Using it"
example); docs/*.md are run by tests/test_docs.py.
"""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_round_trips():
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    assert blocks, "README.md has no python example"
    ns: dict = {}
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast and never oversubscribes
    try:
        for i, code in enumerate(blocks):
            exec(compile(code, f"{README} (python block {i + 1})", "exec"), ns)
    finally:
        torch.set_num_threads(threads)
    out, ids = ns["out"], ns["ids"]
    assert out.state.segments == 16 and ns["stack"].state.segments == 16
    assert ns["continuation"].shape == (2, 132)
    with torch.no_grad():
        a = ns["stack"](ids[:, :200]).logits
        b = ns["restored"](ids[:, :200]).logits
    assert torch.equal(a, b)
