"""utils/fs.py: the one "may I write here" rule, staged commits, roll-forward after a crash, permissions."""

import json
import os
import stat

import pytest

from lorakit.utils import fs
from lorakit.utils.fs import MANIFEST, OutputError, check_output_folder, output_folder, read_manifest


def _write(folder, files):
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def test_new_and_empty_folders_are_written(tmp_path):
    with output_folder(tmp_path / "new", "merge") as stage:
        _write(stage, {"a.txt": "1", "sub/b.txt": "2"})
    assert (tmp_path / "new" / "sub" / "b.txt").read_text() == "2"
    assert read_manifest(tmp_path / "new") == {"format": 1, "kind": "merge", "files": ["a.txt", "sub/b.txt"]}
    (tmp_path / "empty").mkdir()
    with output_folder(tmp_path / "empty", "merge") as stage:
        _write(stage, {"a.txt": "1"})
    assert (tmp_path / "empty" / "a.txt").read_text() == "1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_a_folder_with_other_files_is_refused_and_left_alone(tmp_path):
    _write(tmp_path, {"notes.txt": "mine", "data/x.csv": "1,2"})
    with pytest.raises(OutputError, match=r"is not empty \(it holds data/, notes.txt\) and is not a lorakit output"):
        with output_folder(tmp_path, "merge", overwrite=True) as stage:
            _write(stage, {"config.json": "{}"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_previous_output_needs_overwrite_and_keeps_foreign_files(tmp_path):
    out = tmp_path / "out"
    with output_folder(out, "merge") as stage:
        _write(stage, {"model-1.bin": "old1", "model-2.bin": "old2", "config.json": "old"})
    (out / "README-mine.md").write_text("keep me")
    with pytest.raises(OutputError, match="already holds a lorakit merge output; pass --overwrite"):
        check_output_folder(out, "merge")
    with pytest.raises(OutputError, match="holds a lorakit merge output, not a adapter output"):
        check_output_folder(out, "adapter", overwrite=True)
    with output_folder(out, "merge", overwrite=True) as stage:
        _write(stage, {"model-1.bin": "new1", "config.json": "new"})
    assert sorted(p.name for p in out.iterdir()) == ["README-mine.md", "config.json", MANIFEST, "model-1.bin"]
    assert (out / "model-1.bin").read_text() == "new1" and (out / "README-mine.md").read_text() == "keep me"
    assert read_manifest(out)["files"] == ["config.json", "model-1.bin"]  # the stale shard is gone, and unlisted


def test_an_exception_while_writing_leaves_the_previous_output_intact(tmp_path):
    out = tmp_path / "out"
    with output_folder(out, "adapter") as stage:
        _write(stage, {"w.bin": "v1"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with output_folder(out, "adapter", overwrite=True) as stage:
            _write(stage, {"w.bin": "v2-half"})
            raise Boom
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_crash_during_the_commit_rolls_forward_on_the_next_write(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with output_folder(out, "merge") as stage:
        _write(stage, {"a": "old", "b": "old"})
    real_replace, moved = os.replace, []

    def die_after_one(src, dst):
        if ".lorakit-staging-" in str(src) and "staging" not in str(dst):
            if moved:
                raise KeyboardInterrupt  # the process is killed between two renames
            moved.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(fs.os, "replace", die_after_one)
    with pytest.raises(KeyboardInterrupt):
        with output_folder(out, "merge", overwrite=True) as stage:
            _write(stage, {"a": "new", "b": "new"})
    monkeypatch.setattr(fs.os, "replace", real_replace)
    assert sorted((out / n).read_text() for n in "ab") == ["new", "old"]  # half committed
    check_output_folder(out, "merge", overwrite=True)  # the next run finishes the commit first
    assert [(out / n).read_text() for n in "ab"] == ["new", "new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_inputs_are_never_targets(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(OutputError, match="is the base model's folder"):
        check_output_folder(tmp_path / "x" / ".." / "model", "merge", protect=[(model, "the base model's folder")])


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with output_folder(tmp_path / "out", "merge") as stage:
            _write(stage, {"model.safetensors": "x", "sub/tok.json": "{}"})
            os.chmod(stage / "model.safetensors", 0o600)  # as a temporary file would be
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(tmp_path / "out") == 0o755 and mode(tmp_path / "out" / "sub") == 0o755
    assert mode(tmp_path / "out" / "model.safetensors") == 0o644 and mode(tmp_path / "out" / MANIFEST) == 0o644


def test_claim_and_remove_touch_only_owned_entries(tmp_path):
    run = tmp_path / "run"
    fs.claim_folder(run, "run", ("metrics.jsonl", "checkpoint-*"))
    _write(run, {"metrics.jsonl": "{}", "checkpoint-000002/state": "s", "mine.txt": "keep"})
    with pytest.raises(OutputError, match="pass --resume to continue it or --overwrite"):
        fs.claim_folder(run, "run", ("metrics.jsonl",))
    fs.claim_folder(run, "run", ("metrics.jsonl", "checkpoint-*"), resume=True)
    assert (run / "checkpoint-000002").is_dir()
    fs.claim_folder(run, "run", ("metrics.jsonl", "checkpoint-*"), overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == [MANIFEST, "mine.txt"]
    fs.remove_owned(run)
    assert sorted(p.name for p in run.iterdir()) == ["mine.txt"]
    with pytest.raises(OutputError, match="not a lorakit output folder"):
        fs.remove_owned(run)


def test_single_files(tmp_path):
    theirs = tmp_path / "report.html"
    theirs.write_text("<html>my own page</html>")
    ours = lambda p: "lorakit" in p.read_text()
    with pytest.raises(OutputError, match="was not written by lorakit"):
        fs.check_output_file(theirs, "report", True, ours)
    theirs.write_text("<html>lorakit</html>")
    with pytest.raises(OutputError, match="pass --overwrite"):
        fs.check_output_file(theirs, "report", False, ours)
    assert fs.check_output_file(theirs, "report", True, ours) == theirs
    with fs.atomic_file(tmp_path / "f.json") as tmp:
        tmp.write_text(json.dumps({"a": 1}))
    assert json.loads((tmp_path / "f.json").read_text()) == {"a": 1}
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o666 & ~_umask()


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m
