import pytest

from memstack.io import atomic_directory, read_manifest, write_json


def test_atomic_directory_replaces_on_success_and_keeps_old_on_failure(tmp_path):
    target = tmp_path / "store"
    with atomic_directory(target) as d:
        (d / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as d:
            (d / "a.txt").write_text("half-new")
            raise RuntimeError("crash mid-write")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["store"]  # no temp dirs left behind
    with atomic_directory(target) as d:
        (d / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


def test_read_manifest_validates(tmp_path):
    p = tmp_path / "m.json"
    write_json(p, {"format": "memstack", "version": 1, "x": 2})
    assert read_manifest(p, "memstack", 1)["x"] == 2
    with pytest.raises(ValueError, match="not a store manifest"):
        read_manifest(p, "store", 1)
    write_json(p, {"format": "memstack", "version": 9})
    with pytest.raises(ValueError, match="version 9"):
        read_manifest(p, "memstack", 1)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(p, "memstack", 1)
