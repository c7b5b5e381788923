"""What the package needs installed and shipped: matplotlib and datasets are optional extras
imported only when used, and the corpora live in the repository, not in the wheel."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest

from memstack.data import filler
from memstack.data.filler import CORPORA_ENV, default_filler_path, filler_text
from memstack.data.tasks import passkey_sample
from memstack.data.text import load_text_dataset
from memstack.data.tokenizer import load_tokenizer
from memstack.train.plots import passkey_heatmap, training_curves

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "memstack"
OPTIONAL = {"matplotlib": "plots", "datasets": "text"}
"""Optional libraries and the extra that installs each."""


def test_pyproject_makes_plotting_and_datasets_extras():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    required = {d.split(">")[0].split("=")[0].strip() for d in project["project"]["dependencies"]}
    extras = project["project"]["optional-dependencies"]
    for library, extra in OPTIONAL.items():
        assert library not in required
        assert any(d.startswith(library) for d in extras[extra])
        assert any(d.startswith(library) for d in extras["dev"])  # the tests use both
    assert "package-data" not in project.get("tool", {}).get("setuptools", {})


def _top_level_imports(tree: ast.Module):
    """Imports that run when the module is imported: outside functions and TYPE_CHECKING blocks."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        elif (
            isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
        ):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def test_optional_libraries_are_imported_inside_functions_only():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in _top_level_imports(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno} imports {n}"
                for n in names
                if getattr(node, "level", 0) == 0 and n.split(".")[0] in OPTIONAL
            ]
    assert not offenders, offenders


def test_plotting_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    result = {"memory_on": {"accuracy": [[1.0]], "lengths": [64], "depths": [0.5]}}
    with pytest.raises(ImportError, match=r'^plotting needs matplotlib: pip install "memstack\[plots\]"$'):
        passkey_heatmap(result, tmp_path / "a.png")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    with pytest.raises(ImportError, match=r"memstack\[plots\]"):
        training_curves(metrics, tmp_path / "b.png")
    assert not (tmp_path / "a.png").exists()


def test_plotting_with_matplotlib_still_draws(tmp_path):
    result = {"memory_on": {"accuracy": [[1.0, 0.5]], "lengths": [64], "depths": [0.25, 0.75]}}
    path = passkey_heatmap(result, tmp_path / "a.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_datasets_without_datasets_names_the_extra(monkeypatch, tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("one document\n")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(
        ImportError, match=r'^loading text datasets needs datasets: pip install "memstack\[text\]"$'
    ):
        load_text_dataset(text)


# The corpora -------------------------------------------------------------------------------------


def test_the_package_holds_only_python():
    """Nothing under src/memstack is data the code reads: the wheel is code only."""
    others = [
        p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts
    ]
    assert not others, others


def test_default_filler_is_read_from_the_checkout(monkeypatch):
    monkeypatch.delenv(CORPORA_ENV, raising=False)
    assert default_filler_path() == ROOT / "corpora" / "kjv.txt"
    assert filler_text("train").startswith("In the beginning God created the heaven and the earth.")


def test_the_corpora_folder_can_be_named(monkeypatch, tmp_path):
    (tmp_path / "kjv.txt").write_text("Genesis 1\n\n" + " ".join(f"w{i}" for i in range(20)) + "\n")
    monkeypatch.setenv(CORPORA_ENV, str(tmp_path))
    assert default_filler_path() == tmp_path / "kjv.txt"
    assert filler_text("test") == "w18 w19"


def test_a_missing_corpus_says_what_to_do(monkeypatch, tmp_path):
    filler_text("test")  # the checkout's text is cached now: the variable must still be honoured
    monkeypatch.setenv(CORPORA_ENV, str(tmp_path))  # an empty folder
    expected = (
        f"the default filler text kjv.txt is missing ({CORPORA_ENV}='{tmp_path}'): it is in the memstack "
        f"repository's corpora/ folder, not in the installed package; set {CORPORA_ENV} to a folder "
        "holding kjv.txt, or pass your own UTF-8 text file as filler_path"
    )
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(expected)}$"):
        filler_text("test")
    with pytest.raises(FileNotFoundError, match=CORPORA_ENV):
        passkey_sample(load_tokenizer("bytes"), 300, 0.5, seed=0, filler="text")
    # an explicit text needs no corpora
    own = tmp_path / "own.txt"
    own.write_text(" ".join(f"w{i}" for i in range(20)))
    assert filler_text("test", own) == "w18 w19"


def test_an_installed_package_without_the_repository(monkeypatch, tmp_path):
    """Installed as a wheel, memstack sits in site-packages, in no checkout: a clear error."""
    monkeypatch.delenv(CORPORA_ENV, raising=False)
    site = tmp_path / "lib" / "site-packages" / "memstack" / "data"
    site.mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "someone-else"\n')  # a project using memstack
    (tmp_path / "corpora").mkdir()
    (tmp_path / "corpora" / "kjv.txt").write_text("not memstack's\n")
    monkeypatch.setattr(filler, "__file__", str(site / "filler.py"))
    with pytest.raises(FileNotFoundError, match=rf"is in no source checkout\): .* set {CORPORA_ENV}"):
        default_filler_path()
