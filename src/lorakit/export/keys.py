"""Everything GGUF export maps: HF architecture -> llama.cpp architecture, HF tensor names -> GGUF
names, the per-family weight transforms, the hyperparameter keys, and which ggml type each tensor
gets for each --quant. Plain tables and small functions; the writer is export/gguf.py.

Per family (what llama.cpp's convert_hf_to_gguf.py does, conversion/{llama,qwen,gemma,phi}.py):
    llama  (Llama, HF Mistral)  q_proj / k_proj rows permuted for llama.cpp's rope (adjacent pairs
                                instead of HF's two halves); biases too; k with n_head_kv
    qwen2                       as is; q/k/v biases kept (F32); rope.freq_base written (1e6)
    gemma2                      every *norm.weight + 1 (HF stores w for x * (1 + w)); no output.weight
                                (tied); softcapping, sliding window, head_dim keys
    phi3                        qkv_proj and gate_up_proj stay fused (attn_qkv, ffn_up)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch

# HF architectures[0] -> (gguf-py MODEL_ARCH member, llama.cpp architecture name)
ARCHITECTURES = {
    "LlamaForCausalLM": ("LLAMA", "llama"),
    "MistralForCausalLM": ("LLAMA", "llama"),
    "Qwen2ForCausalLM": ("QWEN2", "qwen2"),
    "Gemma2ForCausalLM": ("GEMMA2", "gemma2"),
    "Phi3ForCausalLM": ("PHI3", "phi3"),
}
QUANTS = ("f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k_m", "q6_k")
# --quant -> gguf.LlamaFileType member (general.file_type) and the default ggml type of 2-D weights
FILE_TYPES = {"f16": ("MOSTLY_F16", "F16"), "bf16": ("MOSTLY_BF16", "BF16"), "q8_0": ("MOSTLY_Q8_0", "Q8_0"),
              "q4_0": ("MOSTLY_Q4_0", "Q4_0"), "q5_0": ("MOSTLY_Q5_0", "Q5_0"),
              "q4_k_m": ("MOSTLY_Q4_K_M", "Q4_K"), "q6_k": ("MOSTLY_Q6_K", "Q6_K")}
BLOCK = {"F16": 1, "BF16": 1, "F32": 1, "Q8_0": 32, "Q4_0": 32, "Q5_0": 32, "Q5_1": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
# llama.cpp's fallback when a row does not split into blocks (llama-quant.cpp tensor_type_fallback)
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


class ExportError(ValueError):
    """lorakit cannot export this model as GGUF: the message names the field and what is supported."""


@dataclass(frozen=True)
class Arch:
    hf: str        # "LlamaForCausalLM"
    member: str    # gguf.MODEL_ARCH member name
    name: str      # llama.cpp architecture string
    config: object  # the transformers config (text part)

    @property
    def n_layer(self) -> int:
        return self.config.num_hidden_layers


# model_type -> the causal-LM class, for a config.json without "architectures" (as AutoModelForCausalLM maps it)
BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "phi3": "Phi3ForCausalLM"}


def architecture(config) -> Arch:
    archs = list(getattr(config, "architectures", None) or [])
    if not archs and getattr(config, "model_type", None) in BY_MODEL_TYPE:
        archs = [BY_MODEL_TYPE[config.model_type]]
    if not archs or archs[0] not in ARCHITECTURES:
        raise ExportError(f"config.json architectures={archs}: lorakit exports GGUF for "
                          f"{', '.join(ARCHITECTURES)} only")
    member, name = ARCHITECTURES[archs[0]]
    return Arch(archs[0], member, name, config)


def rope_params(config) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters` (older: rope_theta + rope_scaling)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ------------------------------------------------------------------ hyperparameters


def write_hparams(w, arch: Arch) -> list[tuple[str, torch.Tensor]]:
    """The {arch}.* keys llama.cpp reads for this family; returns generated tensors (rope_freqs)."""
    import gguf

    c = arch.config
    n_head, n_kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    hd = head_dim(c)
    rope = rope_params(c)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_key_length(hd)
    w.add_value_length(hd)
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    extra: list[tuple[str, torch.Tensor]] = []
    kind = rope["rope_type"]
    if arch.name == "gemma2":
        if kind != "default":
            raise ExportError(f"gemma2 rope_type={kind!r}: only the default rope is exported")
        scalar = getattr(c, "query_pre_attn_scalar", hd)
        if scalar != hd and not (scalar == c.hidden_size // n_head):
            raise ExportError(f"gemma2 query_pre_attn_scalar={scalar}: llama.cpp scales queries by 1/sqrt(head_dim "
                              f"{hd}) (or hidden/heads for the 27B shape); this model's would differ")
        if c.attn_logit_softcapping is not None:
            w.add_attn_logit_softcapping(float(c.attn_logit_softcapping))
        if c.final_logit_softcapping is not None:
            w.add_final_logit_softcapping(float(c.final_logit_softcapping))
        w.add_sliding_window(int(c.sliding_window or 0))
        return extra
    if arch.name == "phi3":
        partial = getattr(c, "partial_rotary_factor", 1.0) or 1.0
        w.add_rope_dimension_count(int(partial * c.hidden_size) // n_head)
        w.add_rope_scaling_orig_ctx_len(int(getattr(c, "original_max_position_embeddings", None) or c.max_position_embeddings))
        w.add_sliding_window(int(getattr(c, "sliding_window", None) or 0))
        if kind not in ("default", None):
            raise ExportError(f"phi3 rope_type={kind!r} (longrope, 128k variants): not exported yet; "
                              f"the 4k-context Phi-3 models are")
        return extra
    w.add_rope_dimension_count(hd)
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "llama3" and arch.name == "llama":
        extra.append(("rope_freqs.weight", llama3_rope_factors(rope, hd)))
    elif kind != "default":
        raise ExportError(f"{arch.name} rope_type={kind!r}: lorakit exports default, linear and llama3 rope only")
    return extra


def llama3_rope_factors(rope: dict, dim: int) -> torch.Tensor:
    """Llama-3.1 rope: one factor per frequency, written as rope_freqs.weight [dim / 2] (F32)
    (llama.cpp conversion/llama.py generate_extra_tensors)."""
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old = int(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factors = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            s = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - s) / factor + s))
    return torch.tensor(factors, dtype=torch.float32)


# ------------------------------------------------------------------ tensor names and transforms


class TensorNames:
    """HF checkpoint name -> GGUF name (gguf-py's own tables), or None for tensors llama.cpp does not take."""

    def __init__(self, arch: Arch, tied: bool):
        import gguf

        self.arch, self.tied = arch, tied
        self.map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.member), arch.n_layer)

    def gguf_name(self, hf: str) -> Optional[str]:
        if hf.endswith((".rotary_emb.inv_freq", "attention.masked_bias", "attention.bias")):
            return None
        if hf == "lm_head.weight" and (self.tied or self.arch.name == "gemma2"):
            return None  # llama.cpp reuses token_embd as the output when output.weight is absent
        name = self.map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"tensor {hf!r} has no GGUF name for {self.arch.name}; this checkpoint has parts "
                              f"llama.cpp's {self.arch.name} model does not have")
        return name


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rope halves -> llama.cpp's adjacent pairs, per head: rows [h, 2, d/2] -> [h, d/2, 2]
    (conversion/llama.py LlamaModel.permute); w is [out, in] or a bias [out]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def transform(arch: Arch, hf: str, t: torch.Tensor) -> torch.Tensor:
    """The family's weight transform for one tensor (module docstring)."""
    c = arch.config
    if arch.name == "llama":
        if re.search(r"\.self_attn\.q_proj\.(weight|bias)$", hf):
            return llama_permute(t, c.num_attention_heads)
        if re.search(r"\.self_attn\.k_proj\.(weight|bias)$", hf):
            return llama_permute(t, getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    if arch.name == "gemma2" and hf.endswith("norm.weight"):
        return t.float() + 1.0
    return t


# ------------------------------------------------------------------ which ggml type per tensor


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's Q4_K_M rule: the first and last eighth of the layers and every third in between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def is_70b(arch: Arch) -> bool:
    """llama.cpp's LLM_TYPE_70B (80 layers: Llama with grouped-query attention, Qwen2), the one model
    size its quant mix treats specially (src/models/{llama,qwen2}.cpp)."""
    c = arch.config
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return c.num_hidden_layers == 80 and (arch.name == "qwen2" or (arch.name == "llama" and n_kv != c.num_attention_heads))


def tensor_type(gguf_name: str, shape: tuple, quant: str, n_layer: int, tied: bool, big: bool = False) -> str:
    """The ggml type of one tensor (shape = numpy [rows, cols]) for --quant `quant`:
    1-D tensors and norms F32 (convert_hf_to_gguf); f16/bf16/q8_0 put every 2-D weight in that type
    (convert_hf_to_gguf --outtype); q4_0/q5_0/q4_k_m/q6_k follow llama-quantize's mix: the output head
    (the token embedding when tied) Q6_K, and for q4_k_m attn_v / attn_qkv and ffn_down Q6_K in the
    layers use_more_bits picks (70B: the other attn_v Q5_K). A row that does not split into blocks falls back as llama.cpp does."""
    if len(shape) < 2 or gguf_name.endswith(("_norm.weight", ".bias")) or not gguf_name.endswith(".weight"):
        return "F32"
    default = FILE_TYPES[quant][1]
    qtype = default
    if quant in ("q4_0", "q5_0", "q4_k_m", "q6_k"):
        if gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight"):
            qtype = "Q6_K" if shape[-1] % 256 == 0 else "Q8_0"
        elif quant == "q4_k_m":
            layer = re.match(r"blk\.(\d+)\.", gguf_name)
            i = int(layer.group(1)) if layer else 0
            if gguf_name.endswith(("attn_v.weight", "attn_qkv.weight", "ffn_down.weight")) and use_more_bits(i, n_layer):
                qtype = "Q6_K"
            elif big and gguf_name.endswith(("attn_v.weight", "attn_qkv.weight")):
                qtype = "Q5_K"  # 70B: 8 heads share each attn_v, so it gets more bits cheaply
    cols = shape[-1]
    if cols % BLOCK[qtype]:
        qtype = FALLBACK.get(qtype, qtype)
        if cols % BLOCK[qtype]:
            qtype = "F16"
    return qtype
