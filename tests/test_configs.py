"""Every example config parses, and its first line is the command that runs it."""

from pathlib import Path

import pytest

from lorakit.config import load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_names_its_command(path):
    cfg = load_config(path)
    assert cfg.model.name_or_path and cfg.data.path
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# lorakit train configs/{path.name}")


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"qlora-7b-t4.yaml", "cpu-lora.yaml"} <= names
