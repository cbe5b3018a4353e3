"""Tiny random-weight models of the real architectures, built from configs (import from any test)."""

import torch
import transformers

from lorakit.data.tokenize import IGNORE_INDEX

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=160, max_position_embeddings=128)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", None),
}


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """A randomly initialised `arch` model with 2 layers and hidden size 64 (fp32, eval mode)."""
    cfg_name, model_name, extra = ARCHS[arch]
    if extra is None:  # GPT-2 uses its own field names
        kwargs = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=TINY["vocab_size"],
                      bos_token_id=0, eos_token_id=0)
    else:
        kwargs = {**TINY, **extra}
    kwargs.update(overrides)
    config = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(dtype)
    return model.eval()


def make_examples(n, seed=0, vocab=160, min_len=5, max_len=14):
    """Token examples of unequal length: the first 3 tokens are the 'prompt' (masked)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()
        labels = [IGNORE_INDEX] * 3 + ids[3:]
        out.append({"input_ids": ids, "labels": labels})
    return out
