"""Which layers get an adapter: "all-linear", a regex, or a list of module-name suffixes.

The semantics are PEFT's, so a `target_modules` list copied from a PEFT config selects the same
layers here: a list entry matches a module whose full name equals it or ends with "." + entry;
a string other than "all-linear" is a regex that must match the full module name. Embedding
tables (nn.Embedding: embed_tokens, wte) are adapted only when named by a list or regex, never
by "all-linear" (PEFT does the same).
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Union

from torch import nn

from .modules import is_linear

ALL_LINEAR = "all-linear"


def name_matches(name: str, spec: Union[str, Iterable[str]]) -> bool:
    """PEFT semantics: regex full match for a string, suffix match for a list."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output projection(s), never adapted by "all-linear" (PEFT does the same)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {n for n, m in model.named_modules() if head is not None and m is head}
    return names or {n for n, _ in model.named_modules() if n.split(".")[-1] in ("lm_head", "embed_out", "output")}


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and is_linear(m) and not _inside_lora(n)]


def embedding_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and isinstance(m, nn.Embedding) and not _inside_lora(n)]


def _inside_lora(name: str) -> bool:
    parts = name.split(".")
    return any(p in ("lora_A", "lora_B", "base_layer", "merged_layer", "original_module") for p in parts)


def find_targets(model: nn.Module, target_modules: Union[str, tuple[str, ...]],
                 exclude_modules: Optional[Union[str, tuple[str, ...]]] = None,
                 embeddings: bool = True) -> list[str]:
    """Full names of the linear layers (and, when named and `embeddings`, embedding tables) to
    adapt; raises if nothing matches, listing what exists."""
    candidates = linear_names(model)
    if target_modules == ALL_LINEAR:
        heads = output_head_names(model)
        chosen = [n for n in candidates if n not in heads]
    else:
        found = candidates + (embedding_names(model) if embeddings else [])
        chosen = [n for n in found if name_matches(n, target_modules)]
    if exclude_modules:
        chosen = [n for n in chosen if not name_matches(n, exclude_modules)]
    if not chosen and not embeddings and target_modules != ALL_LINEAR and any(
            name_matches(n, target_modules) for n in embedding_names(model)):
        return []  # only embedding tables were named and the caller wants linear layers
    if not chosen:
        suffixes = sorted({n.split(".")[-1] for n in candidates})
        tables = sorted({n.split(".")[-1] for n in embedding_names(model)})
        raise ValueError(
            f"lora.target_modules={target_modules!r} matched no linear layer "
            f"(exclude_modules={exclude_modules!r}). This model's linear layers are named: "
            f"{', '.join(suffixes)} (e.g. {candidates[0] if candidates else 'none'})"
            f"{'; its embedding tables: ' + ', '.join(tables) if tables and embeddings else ''}; "
            f"use a list of these names, a regex over full names, or 'all-linear'.")
    return chosen
