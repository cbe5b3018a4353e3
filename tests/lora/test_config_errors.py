"""Bad LoRA options fail early with a message naming the option and the allowed values."""

import pytest

import lorakit
from lorakit.config import ConfigError, load_config

from tiny_models import tiny_model


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(r=0), r"lora\.r=0 .*integer > 0"),
    (dict(r=-3), r"lora\.r=-3"),
    (dict(alpha=0), r"lora\.alpha=0 .*> 0"),
    (dict(dropout=1.0), r"lora\.dropout=1\.0 .*\[0, 1\)"),
    (dict(dropout=-0.1), r"lora\.dropout"),
    (dict(bias="some"), r"lora\.bias='some'.*'none', 'all', 'lora_only'"),
])
def test_bad_lora_config(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        lorakit.LoraConfig(**kwargs)


def test_no_module_matched_lists_the_linear_names():
    with pytest.raises(ValueError, match=r"matched no linear layer.*down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        lorakit.add_lora(tiny_model("llama"), lorakit.LoraConfig(target_modules=("query",)))


def test_regex_and_exclude_targets():
    from lorakit.model.targets import find_targets
    model = tiny_model("llama")
    assert find_targets(model, r".*\.layers\.1\.self_attn\.(q|v)_proj") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    names = find_targets(model, "all-linear", exclude_modules=("down_proj",))
    assert "lm_head" not in names and not any(n.endswith("down_proj") for n in names) and len(names) == 12


def test_yaml_unknown_key_and_wrong_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rank: 8\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'lora\.rank'.*alpha"):
        load_config(path)
    path.write_text("train:\n  micro_batch_size: four\n")
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size='four' has the wrong type; expected int"):
        load_config(path)


def test_dotted_overrides_and_yaml_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 2e-4\nlora:\n  target_modules: [q_proj, v_proj]\n")
    cfg = load_config(path, ["lora.r=32", "train.grad_accum=4"])
    assert cfg.train.lr == 2e-4 and cfg.lora.r == 32 and cfg.train.grad_accum == 4
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
