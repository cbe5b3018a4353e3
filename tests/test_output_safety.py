"""No command deletes or replaces what lorakit did not write (issue: output safety).

A sentinel file in the target folder survives every command; --overwrite replaces only lorakit's
files; merging over the base model is refused; a crash mid-write leaves the previous output intact.
"""

import argparse
import json
import stat

import pytest

import lorakit
from lorakit.cli import main
from lorakit.model.quantized_checkpoint import save_quantized
from lorakit.recipes import sweep
from lorakit.utils.fs import MANIFEST, OutputError

from tiny_models import tiny_model
from tiny_tokenizers import write_jsonl, write_tiny_model_folder

SENTINEL = "my-notes.txt"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = [{"prompt": f"animal {i % 4}:", "completion": f" {'cat dog fox owl'.split()[i % 4]}"} for i in range(16)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


@pytest.fixture(scope="module")
def adapter_dir(model_dir, data_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    assert main(train_argv(model_dir, data_file, run)) == 0
    return run / "adapter"


def train_argv(model_dir, data_file, out, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data_file), "--no-progress", "--train.max_steps", "2",
            "--train.precision", "fp32", "--train.output_dir", str(out), "--set", "data.val_size=0", *extra]


def with_sentinel(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SENTINEL).write_text("do not lose me")
    return folder


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_train_refuses_a_foreign_folder(model_dir, data_file, tmp_path, capsys):
    out = with_sentinel(tmp_path / "out")
    assert main(train_argv(model_dir, data_file, out)) == 2
    assert main(train_argv(model_dir, data_file, out, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert f"it holds {SENTINEL}" in err and "not a lorakit output folder" in err and "Traceback" not in err
    assert snapshot(out) == {SENTINEL: b"do not lose me"}


def test_train_overwrite_replaces_only_its_run(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(model_dir, data_file, out, "--train.save_every", "1")) == 0
    (out / SENTINEL).write_text("do not lose me")
    assert main(train_argv(model_dir, data_file, out)) == 2
    assert "pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert (out / "checkpoint-000001").is_dir()
    assert main(train_argv(model_dir, data_file, out, "--overwrite", "--train.save_every", "0")) == 0
    names = sorted(p.name for p in out.iterdir())
    assert SENTINEL in names and "checkpoint-000001" not in names and "checkpoint-000002" in names
    assert (out / SENTINEL).read_text() == "do not lose me"


def test_merge_refuses_foreign_folders_and_its_own_base(model_dir, adapter_dir, tmp_path, capsys):
    for out in (with_sentinel(tmp_path / "out"), model_dir):
        before = snapshot(out)
        assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter_dir), "--out", str(out),
                     "--precision", "fp32", "--overwrite"]) == 2
        assert snapshot(out) == before
    err = capsys.readouterr().err
    assert "not a lorakit output folder" in err and "is the base model's folder (--model)" in err


def test_merge_overwrite_replaces_only_lorakit_files(model_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    argv = ["merge", "--model", str(model_dir), "--adapter", str(adapter_dir), "--out", str(out), "--precision", "fp32"]
    assert main(argv) == 0
    (out / SENTINEL).write_text("do not lose me")
    (out / "sub").mkdir()
    (out / "sub" / "mine.bin").write_bytes(b"\x00\x01")
    assert main(argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert (out / SENTINEL).read_text() == "do not lose me" and (out / "sub" / "mine.bin").read_bytes() == b"\x00\x01"
    assert (out / "model.safetensors").is_file() and (out / MANIFEST).is_file()
    manifest = json.loads((out / MANIFEST).read_text())
    assert SENTINEL not in manifest["files"] and "model.safetensors" in manifest["files"]
    mode = stat.S_IMODE((out / "model.safetensors").stat().st_mode)
    assert mode & 0o044 == 0o044  # readable by others (umask 022): a serving container can read it


@pytest.mark.parametrize("path", ["streaming", "in-memory"])
def test_a_crash_mid_merge_leaves_the_previous_merge(model_dir, adapter_dir, tmp_path, monkeypatch, path):
    out = tmp_path / "merged"
    argv = ["merge", "--model", str(model_dir), "--adapter", str(adapter_dir), "--out", str(out), "--precision", "fp32"]
    if path == "in-memory":
        argv.append("--verify")
    assert main(argv) == 0
    before = snapshot(out)

    def dies_half_way(self, folder, *a, **k):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    if path == "streaming":
        import lorakit.export.hf as hf

        def stream_dies(file, *a, **k):
            dies_half_way(None, file.parent)

        monkeypatch.setattr(hf, "write_safetensors_stream", stream_dies)
    else:
        model_cls = type(lorakit.load_model(str(model_dir), compute_dtype="fp32")[0])
        monkeypatch.setattr(model_cls, "save_pretrained", dies_half_way)
    with pytest.raises(RuntimeError, match="disk full"):
        main(argv + ["--overwrite"])
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_save_adapter_and_save_quantized_follow_the_rule(tmp_path):
    model = lorakit.add_lora(tiny_model("llama"), lorakit.LoraConfig(r=2))
    folder = with_sentinel(tmp_path / "a")
    with pytest.raises(OutputError, match="not a lorakit output folder"):
        lorakit.save_adapter(model, folder, overwrite=True)
    lorakit.save_adapter(model, tmp_path / "b")
    with pytest.raises(OutputError, match="pass --overwrite"):
        lorakit.save_adapter(model, tmp_path / "b")
    lorakit.save_adapter(model, tmp_path / "b", overwrite=True)
    q, _ = lorakit.load_model(str(write_tiny_model_folder(tmp_path / "m")), quantization="nf4", load_tokenizer=False)
    with pytest.raises(OutputError, match="not a lorakit output folder"):
        save_quantized(q, folder)
    assert snapshot(folder) == {SENTINEL: b"do not lose me"}


def test_sweep_refuses_a_foreign_folder_and_restart_keeps_foreign_files(model_dir, data_file, tmp_path):
    def run(out, *extra):
        parser = argparse.ArgumentParser()
        sweep.add_arguments(parser)
        return sweep.main(parser.parse_args(["--model", str(model_dir), "--data", str(data_file), "--rank", "2",
                                             "--out", str(out), "--no-progress", "--set", "train.max_steps=1",
                                             "--set", "train.precision=fp32", "--set", "data.val_size=0", *extra]))

    foreign = with_sentinel(tmp_path / "foreign")
    with pytest.raises(OutputError, match="not a lorakit output folder"):
        run(foreign)
    assert snapshot(foreign) == {SENTINEL: b"do not lose me"}
    out = tmp_path / "sweep"
    assert run(out) == 0
    with_sentinel(out)
    with_sentinel(out / "r2-lora")
    assert run(out, "--restart") == 0
    assert (out / SENTINEL).is_file() and (out / "r2-lora" / SENTINEL).is_file()
    assert (out / "r2-lora" / "adapter" / "adapter_model.safetensors").is_file()


def test_report_out_never_replaces_a_foreign_file(adapter_dir, tmp_path, capsys):
    run = adapter_dir.parent
    target = tmp_path / "page.html"
    target.write_text("<html>my page</html>")
    assert main(["report", str(run), "--out", str(target), "--overwrite"]) == 2
    assert target.read_text() == "<html>my page</html>"
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["report", str(run), "--out", str(tmp_path / "r.html"), "--overwrite"]) == 0


def test_demo_refuses_a_foreign_folder(tmp_path, capsys):
    out = with_sentinel(tmp_path / "demo")
    assert main(["demo", "--out", str(out), "--no-progress"]) == 2
    assert "not a lorakit output folder" in capsys.readouterr().err
    assert snapshot(out) == {SENTINEL: b"do not lose me"}
