"""The tokenizer as llama.cpp reads it from GGUF (tokenizer.ggml.*), built from tokenizer.json.

Two kinds are exported; anything else is an ExportError (never a file that tokenizes differently):

    byte-level BPE (GPT-2, Llama-3, Qwen2)  model "gpt2": tokens are the byte-level strings ("Ġthe"),
        merges "a b", no scores. The pre-tokenizer type (tokenizer.ggml.pre) is read from the
        tokenizer's own pre-tokenizer: the regex llama.cpp implements for that name must be the one
        the tokenizer splits with (see PRE_TOKENIZERS). llama.cpp's converter hashes the token ids of
        a fixed text instead, which only recognises unmodified published vocabularies.
    SentencePiece-style BPE (Llama-2, Gemma, Phi-3, Mistral v0.1)  model "llama": tokenizer.json's
        BPE with byte_fallback and "▁" for spaces; llama.cpp's SPM tokenizer merges by token score,
        so each token's score is minus the rank of the first merge that makes it (the BPE order).

Vocabulary length = the embedding rows: ids the tokenizer does not use become "[PADi]" (UNUSED).
Token types: special added tokens CONTROL, other added tokens USER_DEFINED, <0xXX> BYTE, the unk
token UNKNOWN, the rest NORMAL. Special ids, add_bos/add_eos and the chat template come from the
transformers tokenizer itself (what it really does), not from parsing its files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .keys import ExportError

# llama.cpp pre-tokenizer name -> the Split regex of tokenizer.json it implements (src/llama-vocab.cpp)
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}
SPACE = "\u2581"  # SentencePiece's "▁"

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType


@dataclass
class Vocab:
    model: str                      # tokenizer.ggml.model: "gpt2" | "llama"
    pre: str                        # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: Optional[list[float]] = None
    merges: Optional[list[str]] = None
    special: dict[str, int] = field(default_factory=dict)   # bos / eos / unk / pad -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: Optional[bool] = None
    chat_template: Optional[object] = None
    rstrip_specials: bool = False   # special added tokens eat the whitespace after them (Phi-3)

    def write(self, w) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges is not None:
            w.add_token_merges(self.merges)
        for kind, tid in self.special.items():
            getattr(w, f"add_{kind}_token_id")(tid)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def read_vocab(folder: Path, n_vocab: int) -> Vocab:
    """The GGUF vocabulary of the tokenizer in `folder` for a model with `n_vocab` embedding rows."""
    from transformers import AutoTokenizer

    file = Path(folder) / "tokenizer.json"
    if not file.is_file():
        raise ExportError(f"{folder}: no tokenizer.json; GGUF export reads the fast tokenizer's file (save the "
                          f"tokenizer with transformers' save_pretrained to write one)")
    spec = json.loads(file.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"{file}: model type {model.get('type')!r}; lorakit exports BPE tokenizers (byte-level "
                          f"or SentencePiece-style) only")
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    vocab = dict(model["vocab"])
    for a in added.values():
        vocab[a["content"]] = a["id"]
    if max(vocab.values()) >= n_vocab:
        raise ExportError(f"{file}: token id {max(vocab.values())} does not fit the model's {n_vocab} embedding rows")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):
        out = _spm_vocab(spec, file, vocab, merges, added, n_vocab, tok)
    else:
        out = _bpe_vocab(spec, file, vocab, merges, added, n_vocab)
    _special_tokens(out, tok, n_vocab)
    out.rstrip_specials = any(a.get("special") and a.get("rstrip") for a in added.values())
    return out


def _by_id(vocab: dict[str, int], n_vocab: int) -> list[Optional[str]]:
    tokens: list[Optional[str]] = [None] * n_vocab
    for text, tid in vocab.items():
        tokens[tid] = text
    return tokens


def _bpe_vocab(spec, file, vocab, merges, added, n_vocab) -> Vocab:
    pre = byte_level_pre(spec, file)
    tokens = _by_id(vocab, n_vocab)
    types = []
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], t = f"[PAD{i}]", None
            types.append(UNUSED)
        elif i in added:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            types.append(NORMAL)
    if not merges:
        raise ExportError(f"{file}: no BPE merges; llama.cpp needs them for byte-level BPE")
    return Vocab("gpt2", pre, tokens, types, merges=merges)


def byte_level_pre(spec: dict, file: Path) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, or ExportError."""
    norm, pre = spec.get("normalizer"), spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space", False):
        if norm is None:
            return "gpt-2"  # GPT-2's own regex, which llama.cpp implements as "gpt-2"
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space", False):
        split = steps[0]
        regex = (split.get("pattern") or {}).get("Regex")
        name = PRE_TOKENIZERS.get(regex)
        if name is not None and split.get("behavior") == "Isolated" and not split.get("invert", False):
            ignore = bool((spec.get("model") or {}).get("ignore_merges", False))
            if (norm is None or (name == "qwen2" and norm.get("type") == "NFC")) and ignore == (name == "llama-bpe"):
                return name  # llama.cpp's llama-bpe also ignores merges for whole-word tokens, as Llama-3's does
    raise ExportError(f"{file}: pre-tokenizer {pre} with normalizer {norm} is not one llama.cpp implements "
                      f"(supported: GPT-2 byte-level, Llama-3 'llama-bpe', Qwen2 'qwen2'); exporting it would "
                      f"tokenize differently")


def _spm_vocab(spec, file, vocab, merges, added, n_vocab, tok) -> Vocab:
    space_prefix = spm_space_prefix(spec, file)
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        a, b = m.split(" ", 1)
        rank.setdefault(a + b, r)
    unk = (spec.get("model") or {}).get("unk_token")
    tokens = _by_id(vocab, n_vocab)
    types, scores = [], []
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
            types.append(UNUSED)
            scores.append(-1000.0)
            continue
        if i in added and t != unk:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
            scores.append(-1000.0)
            continue
        if t == unk:
            types.append(UNKNOWN)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            types.append(BYTE)
        else:
            types.append(NORMAL)
        # SPM merges the adjacent pair whose result scores highest: score = -(rank of its merge)
        scores.append(-float(rank[t]) if t in rank else (0.0 if len(t) == 1 or types[-1] != NORMAL else -1e6 - i))
    return Vocab("llama", "default", tokens, types, scores=scores, add_space_prefix=space_prefix)


def spm_space_prefix(spec: dict, file: Path) -> bool:
    """Whether a SentencePiece-style tokenizer.json adds "▁" before the text (llama.cpp's
    add_space_prefix); ExportError for normalizations llama.cpp's SPM tokenizer does not do."""
    norm, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    steps = (norm or {}).get("normalizers", [norm]) if (norm or {}).get("type") == "Sequence" else ([norm] if norm else [])
    kinds = [s.get("type") for s in steps]
    replace = [s for s in steps if s.get("type") == "Replace"]
    if pre is None and replace and all(k in ("Prepend", "Replace") for k in kinds):
        if (replace[0].get("pattern") or {}).get("String") == " " and replace[0].get("content") == SPACE:
            return "Prepend" in kinds
    if norm is None and (pre or {}).get("type") == "Metaspace" and pre.get("replacement") == SPACE and not pre.get("split", False):
        return pre.get("prepend_scheme", "always") in ("always", "first")
    raise ExportError(f"{file}: SentencePiece-style normalizer {norm} / pre-tokenizer {pre} is not one llama.cpp's "
                      f"SPM tokenizer reproduces")


def _special_tokens(out: Vocab, tok, n_vocab: int) -> None:
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{kind}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            out.special[kind] = tid
    probe = tok("a b").input_ids
    plain = tok("a b", add_special_tokens=False).input_ids
    bos, eos = out.special.get("bos"), out.special.get("eos")
    out.add_bos = bos is not None and len(probe) > len(plain) and probe[0] == bos
    out.add_eos = eos is not None and len(probe) > len(plain) and probe[-1] == eos
    if "eos" not in out.special:
        raise ExportError("the tokenizer has no eos token; llama.cpp would stop on token id 11")
    out.chat_template = getattr(tok, "chat_template", None)
