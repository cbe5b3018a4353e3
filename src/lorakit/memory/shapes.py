"""Model shapes for the memory estimator: from the built-in table, a config.json, a hub id or a model.

A `ModelShape` holds only what memory depends on: the decoder's widths and counts, the vocabulary,
whether the output head shares the embedding matrix, and a few architecture traits (biases, fused
projections, extra norms, attention implementation). `linear_layers` lists the Linear layers of
one decoder layer with their shapes, named as in Hugging Face's modeling code, so `--targets` and
4-bit storage are counted layer by layer exactly as `add_lora` and `load_model` would see them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

_DATA = Path(__file__).with_name("models.json")

# Per model_type traits that the config fields alone do not say (read from each family's
# transformers modeling_*.py): number of RMSNorms per decoder layer, fused projections, q/k/v bias,
# and the attention implementation transformers picks by default for training.
ARCH_TRAITS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True},                        # Qwen2Attention: q/k/v Linear(bias=True)
    "gemma2": {"norms_per_layer": 4, "attn_impl": "eager",  # Gemma2PreTrainedModel: _supports_sdpa = False
               "attn_softcap": True, "logit_softcap": True},
    "phi3": {"fused_qkv": True, "fused_gate_up": True},  # Phi3Attention.qkv_proj, Phi3MLP.gate_up_proj
}
KNOWN_ARCHS = tuple(ARCH_TRAITS)


@dataclass(frozen=True)
class ModelShape:
    """The sizes memory depends on (names as in transformers' config.json, shortened)."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    norms_per_layer: int = 2
    attn_impl: str = "sdpa"
    attn_softcap: bool = False
    logit_softcap: bool = False

    def linear_layers(self) -> list[tuple[str, int, int, bool]]:
        """(name inside a decoder layer, in_features, out_features, has_bias) for each Linear."""
        h, i, d = self.hidden, self.intermediate, self.head_dim
        q, kv = self.heads * d, self.kv_heads * d
        if self.fused_qkv:
            attn = [("self_attn.qkv_proj", h, q + 2 * kv, self.qkv_bias)]
        else:
            attn = [("self_attn.q_proj", h, q, self.qkv_bias), ("self_attn.k_proj", h, kv, self.qkv_bias),
                    ("self_attn.v_proj", h, kv, self.qkv_bias)]
        attn.append(("self_attn.o_proj", q, h, self.o_bias))
        if self.fused_gate_up:
            mlp = [("mlp.gate_up_proj", h, 2 * i, self.mlp_bias)]
        else:
            mlp = [("mlp.gate_proj", h, i, self.mlp_bias), ("mlp.up_proj", h, i, self.mlp_bias)]
        mlp.append(("mlp.down_proj", i, h, self.mlp_bias))
        return attn + mlp

    def n_params(self) -> int:
        """Total parameters (embedding, decoder layers, final norm, output head unless tied)."""
        per_layer = sum(a * b + (b if bias else 0) for _, a, b, bias in self.linear_layers())
        per_layer += self.norms_per_layer * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * per_layer + self.hidden + head


@lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(_DATA.read_text(encoding="utf-8"))


def builtin_names() -> list[str]:
    return sorted(_table()["models"])


def gpu_table() -> dict[str, int]:
    """GPU name -> usable bytes (nvidia-smi memory.total in MiB, converted)."""
    return {k: v * 2**20 for k, v in _table()["gpus"].items() if not k.startswith("_")}


def _with_traits(fields: dict) -> ModelShape:
    traits = ARCH_TRAITS.get(fields["model_type"], {})
    return ModelShape(**{**traits, **fields})


def from_builtin(name: str) -> ModelShape:
    table = _table()
    key = table["aliases"].get(name.lower(), name.lower())
    if key not in table["models"]:
        raise KeyError(name)
    fields = {k: v for k, v in table["models"][key].items() if k != "hub_id"}
    return _with_traits({"name": key, **fields})


def from_hf_config(cfg: Any, name: str = "") -> ModelShape:
    """From a transformers config object or a config.json dict."""
    get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    model_type = get("model_type") or "llama"
    if get("text_config") is not None and get("hidden_size") is None:  # multimodal wrapper: use its LM
        return from_hf_config(get("text_config"), name)
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if get(k) is None]
    if missing:
        raise ValueError(f"model config {name or model_type!r} lacks {', '.join(missing)}; the estimator needs the "
                         f"fields of a decoder-only transformer (llama, mistral, qwen2, gemma2, phi3 and alike)")
    heads = int(get("num_attention_heads"))
    traits = dict(ARCH_TRAITS.get(model_type, {}))
    fields = dict(
        name=name or get("_name_or_path") or model_type, model_type=model_type,
        hidden=int(get("hidden_size")), intermediate=int(get("intermediate_size")),
        layers=int(get("num_hidden_layers")), heads=heads,
        kv_heads=int(get("num_key_value_heads") or heads),
        head_dim=int(get("head_dim") or int(get("hidden_size")) // heads), vocab=int(get("vocab_size")),
        # transformers' default differs per family: LlamaConfig False, Gemma2Config True
        tied=bool(get("tie_word_embeddings", model_type == "gemma2")),
    )
    if get("attention_bias"):  # Llama/Mistral option: bias on q, k, v and o
        traits.update(qkv_bias=True, o_bias=True)
    if get("mlp_bias"):
        traits["mlp_bias"] = True
    impl = get("_attn_implementation") if not isinstance(cfg, dict) else cfg.get("_attn_implementation")
    if impl in ("eager", "sdpa"):
        traits["attn_impl"] = impl
    elif impl:  # flash_attention_2, flex...: O(T) saved like sdpa's flash kernel
        traits["attn_impl"] = "sdpa"
    return ModelShape(**{**traits, **fields})


def from_model(model: Any) -> ModelShape:
    """From a loaded transformers model (its config, and its attention implementation)."""
    return from_hf_config(model.config, getattr(model.config, "_name_or_path", "") or type(model).__name__)


def resolve_shape(spec: Any) -> ModelShape:
    """A ModelShape from: a ModelShape, a built-in short name (`llama-2-7b`), a local folder or
    config.json path, a transformers config or model, or a hub id (its config.json only, when online)."""
    if isinstance(spec, ModelShape):
        return spec
    if not isinstance(spec, (str, Path)):
        return from_model(spec) if hasattr(spec, "config") and hasattr(spec, "parameters") else from_hf_config(spec)
    text = str(spec)
    try:
        return from_builtin(text)
    except KeyError:
        pass
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        return from_hf_config(json.loads(path.read_text(encoding="utf-8")), name=text)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _from_hub(text)
    raise ValueError(f"--model {text!r} is not a built-in name, a folder with config.json, or a hub id; "
                     f"built-in names: {', '.join(builtin_names())}")


def _from_hub(repo_id: str) -> ModelShape:
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id, "config.json")
    except Exception as e:  # offline, gated, unknown id
        raise ValueError(f"--model {repo_id!r}: could not read its config.json from the hub ({type(e).__name__}: {e}); "
                         f"pass a local folder or one of the built-in names: {', '.join(builtin_names())}") from None
    return from_hf_config(json.loads(Path(path).read_text(encoding="utf-8")), name=repo_id)


def with_attn(shape: ModelShape, attn_impl: Optional[str]) -> ModelShape:
    return shape if not attn_impl else replace(shape, attn_impl=attn_impl)
