"""Offline tokenizers for tests: a byte-level BPE trained on a few sentences, wrapped in
transformers.PreTrainedTokenizerFast. No hub downloads."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nWhat is the capital of France?\n\n### Input:\nEurope\n\n### Response:\nParis is the capital.",
    "The quick brown fox jumps over the lazy dog. Hello world, how are you today?",
    "system user assistant: You are a helpful assistant. Tell me a joke about cats and dogs.",
    "prompt completion text data tokens labels loss packing examples numbers 0123456789",
]

# A ChatML template whose end-of-turn marker is EOS (like Qwen2-Instruct's).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A template whose end-of-turn marker is not EOS and that strips the content (like Llama-3's).
STRIP_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|end|>"]


def _bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def make_tokenizer(kind: str):
    """kind: "plain" (no BOS, no chat template, pad != eos), "pad_eos" (pad == eos),
    "chatml" (chat template ending turns with EOS = <|im_end|>), "llama" (adds BOS; template with
    <|end|> turns, stripped content)."""
    from transformers import PreTrainedTokenizerFast

    tok = _bpe()
    if kind == "llama":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
    eos = "<|im_end|>" if kind == "chatml" else "</s>"
    pad = eos if kind == "pad_eos" else "<pad>"
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token=pad,
                                additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|end|>"])
    if kind == "chatml":
        t.chat_template = CHATML_TEMPLATE
    elif kind == "llama":
        t.chat_template = STRIP_TEMPLATE
    return t


ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen"]


def write_jsonl(path, rows):
    """rows as a .jsonl data file at `path`; returns the path."""
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_tiny_model_folder(folder):
    """A 2-layer Llama + the "plain" tokenizer saved as a model folder (config, safetensors,
    tokenizer). initializer_range 0.2 (not 0.02) lets LoRA alone move the frozen head's logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer("plain")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      initializer_range=0.2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_spm_tokenizer(space_prefix: bool = True):
    """A SentencePiece-style BPE like Llama-2's / Gemma's tokenizer.json (built offline): "▁" for
    spaces (prepended when `space_prefix`), byte fallback to <0x00>..<0xFF>, <unk>/<s>/</s> at ids
    0-2, BOS added. What the SPM path of GGUF export reads."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|end|>"]
    norm = [normalizers.Prepend("\u2581")] if space_prefix else []
    norm.append(normalizers.Replace(" ", "\u2581"))
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.normalizer = normalizers.Sequence(norm)
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False)
    trainer_tok.train_from_iterator(CORPUS * 3, trainer)
    trained = trainer_tok.get_vocab()
    merges = trainer_tok.model.get_merges() if hasattr(trainer_tok.model, "get_merges") else None
    if merges is None:
        import json as _json

        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
                  for m in _json.loads(trainer_tok.to_str())["model"]["merges"]]
    vocab = {s: i for i, s in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for text, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        if text not in vocab:
            vocab[text] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence(norm)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                additional_special_tokens=specials[3:])
    t.chat_template = CHATML_TEMPLATE
    return t
