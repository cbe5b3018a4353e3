"""Methods: named variants of a run, as `lorakit sweep --method` spells them.

A method is parts joined by "+" ("qlora+dora", "pissa+loraplus"); it sets exactly these fields of
a RunConfig (everything else comes from the config):

    model.quantization, lora.use_rslora, lora.use_dora, lora.init, train.loraplus_lr_ratio, train.neftune_alpha

`with_method` applies a name, `method_of` reads it back from a saved run config (report/summary.py).
"""

from __future__ import annotations

import dataclasses

from .config import ConfigError, RunConfig, is_pissa_niter

METHOD_PARTS = ("lora", "qlora", "rslora", "dora", "pissa", "olora", "gaussian", "loraplus", "neftune")
LORAPLUS_DEFAULT_RATIO = 16.0  # LoRA+ paper (Hayou et al. 2024): lr_B / lr_A = 2^4 for their LLM runs
NEFTUNE_DEFAULT_ALPHA = 5.0    # NEFTune paper (Jain et al. 2023): alpha = 5 for its 7B results


def parse_method(method: str) -> tuple[str, ...]:
    """'qlora+dora' -> ('qlora', 'dora'); errors name the part and what is allowed."""
    parts = tuple(p.strip() for p in method.split("+"))
    for p in parts:
        if p not in METHOD_PARTS and not is_pissa_niter(p):
            raise ConfigError(f"--method {method!r}: {p!r} is not allowed; combine with '+' from "
                              f"{', '.join(METHOD_PARTS)} (or pissa_niter_N)")
    if len(set(parts)) != len(parts) or sum(_is_init_part(p) for p in parts) > 1:
        raise ConfigError(f"--method {method!r} repeats a part or names two initialisations")
    return parts


def _is_init_part(part: str) -> bool:
    return part in ("pissa", "olora", "gaussian") or is_pissa_niter(part)


def with_method(cfg: RunConfig, method: str) -> RunConfig:
    """`cfg` with the method's fields set (above): off unless a part turns them on. qlora uses the
    config's 4-bit type (NF4 when it has none); loraplus / neftune the config's ratio / alpha when
    set, else the papers' 16 / 5."""
    parts = parse_method(method)
    init = next((p for p in parts if _is_init_part(p)), "default")
    lora = dataclasses.replace(cfg.lora, use_rslora="rslora" in parts, use_dora="dora" in parts, init=init)
    model = dataclasses.replace(cfg.model, quantization=(cfg.model.quantization or "nf4") if "qlora" in parts else None)
    t = cfg.train
    train = dataclasses.replace(
        t, loraplus_lr_ratio=(t.loraplus_lr_ratio or LORAPLUS_DEFAULT_RATIO) if "loraplus" in parts else 0.0,
        neftune_alpha=(t.neftune_alpha or NEFTUNE_DEFAULT_ALPHA) if "neftune" in parts else 0.0)
    return dataclasses.replace(cfg, lora=lora, model=model, train=train)


def method_of(cfg: dict) -> str:
    """The method name of a run's config (a to_dict / run_config.yaml mapping): 'qlora+dora', 'lora'."""
    model, lora, train = cfg.get("model", {}), cfg.get("lora", {}), cfg.get("train", {})
    init = str(lora.get("init", "default"))
    parts = ["qlora" if model.get("quantization") else "lora"]
    parts += ["rslora"] if lora.get("use_rslora") else []
    parts += ["dora"] if lora.get("use_dora") else []
    parts += [init] if init != "default" else []
    parts += ["loraplus"] if train.get("loraplus_lr_ratio") else []
    parts += ["neftune"] if train.get("neftune_alpha") else []
    return "+".join(parts[1:] if parts[0] == "lora" and len(parts) > 1 else parts)
