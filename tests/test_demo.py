"""The README's main command: `lorakit demo` end to end (QLoRA on the shipped model, offline)."""

import json

from lorakit.cli import main


def test_demo_end_to_end(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"])
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert rc == 0, summary
    assert summary["n_test"] >= 100
    assert summary["exact_match_before"] <= 0.2 and summary["exact_match_after"] >= 0.8
    assert summary["exact_match_merged"] >= 0.8 and summary["same_answers_after_merge"] >= 0.95
    assert (tmp_path / "demo" / "merged" / "config.json").is_file()
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
    assert "exact match" in capsys.readouterr().out
