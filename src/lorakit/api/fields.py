"""A RunConfig from Python arguments: what `lorakit.finetune(...)` and `lorakit.sweep(...)` accept.

    config      a YAML path, a RunConfig or a nested dict (model / lora / data / train), or None
    **fields    config fields by their own name, without the section: r=16, lr=2e-4, max_steps=200,
                quantization="nf4", output_dir="runs/x"; `model` and `data` are the CLI's shortcuts
                (--model, --data) for model.name_or_path and data.path; `lora=LoraConfig(...)` or
                `train={"lr": 1e-3}` set a whole section
    overrides   dotted names, {"train.lr": 1e-4} (values as they are) or ["train.lr=1e-4"] (parsed
                as YAML, exactly like `lorakit train --set`)

Applied in that order onto the config, then validated by config.from_dict: the errors are the
ConfigErrors `lorakit train` prints. A name that is a field of two sections is ambiguous and
refused (the error says how to name it in `overrides`); so is a field given twice.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, Iterable, Mapping, Optional, Union

from ..config import ConfigError, RunConfig, from_dict, load_config, parse_override, to_dict

# The CLI's shortcuts (config.add_run_arguments: --model, --data) as keyword arguments.
SHORTCUTS = {"model": "model.name_or_path", "data": "data.path"}
# Names other tools use (PEFT LoraConfig, transformers TrainingArguments, axolotl): only hints in the
# error message, never accepted silently.
KNOWN_ELSEWHERE = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                   "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
                   "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
                   "gradient_accumulation_steps": "grad_accum", "warmup": "warmup_steps",
                   "lr_scheduler_type": "schedule", "load_in_4bit": "quantization", "dataset": "data",
                   "model_name_or_path": "model", "sequence_len": "max_seq_len", "max_length": "max_seq_len",
                   "gradient_checkpointing_enable": "gradient_checkpointing", "output": "output_dir"}


def sections(cls=RunConfig) -> dict[str, type]:
    """Section name -> its dataclass (model, lora, data, train)."""
    return {name: tp for name, tp in typing.get_type_hints(cls).items() if dataclasses.is_dataclass(tp)}


def field_index(cls=RunConfig) -> dict[str, list[str]]:
    """Field name -> every dotted name it has ("r" -> ["lora.r"]); two entries make it ambiguous."""
    index: dict[str, list[str]] = {}
    for section, tp in sections(cls).items():
        for f in dataclasses.fields(tp):
            index.setdefault(f.name, []).append(f"{section}.{f.name}")
    return index


def dotted_name(name: str, cls=RunConfig) -> str:
    """The dotted config key a keyword argument names, or a ConfigError naming it."""
    if name in SHORTCUTS and cls is RunConfig:
        return SHORTCUTS[name]
    index = field_index(cls)
    found = index.get(name)
    if found is None:
        close = ([KNOWN_ELSEWHERE[name]] if name in KNOWN_ELSEWHERE else
                 difflib.get_close_matches(name, list(index) + list(SHORTCUTS), n=3))
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ConfigError(f"unknown config field {name!r}; {hint}keyword arguments are config fields by their own "
                          f"name (r, lr, max_steps, quantization, output_dir, ...: `lorakit train --help` lists them "
                          f"as --section.field), or dotted names in overrides={{'train.lr': 1e-4}}")
    if len(found) > 1:
        example = ", ".join(f"{{{k!r}: ...}}" for k in found)
        raise ConfigError(f"{name!r} is ambiguous: it is a field of {' and '.join(found)}; name the one you mean "
                          f"in overrides (overrides={example})")
    return found[0]


def _plain(value: Any) -> Any:
    """Python values as the config's own types: paths as strings, dataclasses as dicts."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _set(data: dict, key: str, value: Any, origin: str, given: dict[str, str]) -> None:
    if key in given:
        raise ConfigError(f"{key} is given twice ({given[key]} and {origin}); give it once")
    given[key] = origin
    *path, last = key.split(".")
    node = data
    for k in path:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{origin}: {k!r} is not a config section")
    node[last] = value


def base_dict(config: Union[None, str, os.PathLike, RunConfig, Mapping]) -> dict:
    """The starting point as a nested dict: a YAML file (read and checked by load_config), a
    RunConfig, a dict (checked with everything else at the end), or nothing (the defaults)."""
    if config is None:
        return {}
    if isinstance(config, RunConfig):
        return to_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return to_dict(load_config(config))
    if isinstance(config, Mapping):
        return {k: {kk: _plain(vv) for kk, vv in v.items()} if isinstance(v, Mapping) else _plain(v)
                for k, v in config.items()}
    raise ConfigError(f"config must be a YAML path, a RunConfig or a dict, got {type(config).__name__}")


def config_from_fields(config=None, overrides: Optional[Union[Mapping[str, Any], Iterable[str]]] = None,
                       require: bool = True, **fields) -> RunConfig:
    """RunConfig from `config`, keyword `fields` and dotted `overrides` (module docstring); with
    `require`, model.name_or_path and data.path must be set (as `lorakit train` requires)."""
    data = base_dict(config)
    given: dict[str, str] = {}
    secs = sections()
    for name, value in fields.items():
        if name in secs and (isinstance(value, Mapping) or dataclasses.is_dataclass(value)):
            if dataclasses.is_dataclass(value) and not isinstance(value, secs[name]):
                raise ConfigError(f"{name}= takes a {secs[name].__name__} or a dict, got {type(value).__name__}")
            values = value if isinstance(value, Mapping) else _plain(value)
            for key, v in values.items():
                _set(data, f"{name}.{key}", _plain(v), f"{name}={{{key!r}: ...}}", given)
            continue
        if name in SHORTCUTS and not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"{name}= takes a path or hub id (str), got {type(value).__name__}: lorakit.finetune "
                              f"loads and prepares the model and data itself (model.quantization, data.format, ...)")
        _set(data, dotted_name(name), _plain(value), f"{name}={value!r}", given)
    items = overrides.items() if isinstance(overrides, Mapping) else ((None, o) for o in overrides or ())
    for key, value in items:
        if key is None:  # "section.key=value", parsed exactly as `lorakit train --set`
            keys, value = parse_override(value)
            key = ".".join(keys)
        _set(data, str(key), _plain(value), f"overrides[{key!r}]", given)
    cfg = from_dict(RunConfig, data)
    if require and not cfg.model.name_or_path:
        raise ConfigError("model.name_or_path is not set; pass model='path/or/hub-id' (or model.name_or_path in the config)")
    if require and not cfg.data.path:
        raise ConfigError("data.path is not set; pass data='train.jsonl' (or data.path in the config)")
    return cfg
