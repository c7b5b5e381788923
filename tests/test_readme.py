"""The README's example runs as written and does what it says."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_round_trips():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[0]
    ns: dict = {}
    torch.manual_seed(0)
    exec(compile(code, str(README), "exec"), ns)
    out, ids = ns["out"], ns["ids"]
    assert out.state.segments == 16 and ns["stack"].state.segments == 16
    assert ns["continuation"].shape == (2, 132)
    with torch.no_grad():
        a = ns["stack"](ids[:, :200]).logits
        b = ns["restored"](ids[:, :200]).logits
    assert torch.equal(a, b)
