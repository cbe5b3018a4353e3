"""Tokenize rendered segments into input_ids and labels. The only place -100 is written.

Label convention: `labels` is aligned with `input_ids` (labels[i] is input_ids[i] or
IGNORE_INDEX); the loss shifts by one (logits[:, :-1] against labels[:, 1:]). labels[0] is always
IGNORE_INDEX: no position predicts the first token, so the shifted loss never reads it, and marking
it makes "number of labels != IGNORE_INDEX" equal to the number of loss terms. It also means an
example's first token is never predicted from another example's last one when rows are packed.

Segments are tokenized one by one (add_special_tokens=False) and concatenated, not tokenized
jointly. Two reasons: (1) no token can straddle the prompt/response boundary, so the supervised ids
are exactly tokenize(response) + [eos]; joint tokenization may merge the prompt's last characters
with the response's first ones, and the split would need offsets and rounding. (2) It is what
inference sees: the prompt is tokenized on its own and the model continues after its last token.

EOS: the tokenizer's eos_token_id is appended and supervised, unless the last segment's ids already
end with it (a chat template whose end-of-turn marker is EOS). Which tokens are supervised is
decided by the segments, never by comparing ids with pad_token_id, so EOS stays supervised when
pad == eos.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .formats import detect_format, render
from .sources import DataError

IGNORE_INDEX = -100
"""Label of a position that is not trained on (the default ignore_index of torch.nn.CrossEntropyLoss)."""


@dataclass
class DataStats:
    """What build_examples did: rows in, examples out, and why some rows changed or went away."""

    n_rows: int = 0
    n_examples: int = 0
    n_truncated: int = 0
    """Examples cut to max_seq_len (kept if they still have a supervised token)."""
    n_dropped_no_supervision: int = 0
    """Rows dropped because no supervised token was left (e.g. the prompt alone fills max_seq_len)."""
    n_tokens: int = 0
    n_supervised_tokens: int = 0
    lengths: list[int] = field(default_factory=list)
    format: str = ""


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (padding is never
    supervised nor attended, whatever its id)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front when asked for special tokens (Llama does, GPT-2/Qwen don't)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    return tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def tokenize_example(segments, tokenizer, max_seq_len: int, train_on_inputs: bool = False,
                     adds_bos: bool | None = None) -> dict | None:
    """(text, supervised) segments -> {"input_ids", "labels", "truncated"}; None if nothing is supervised.

    input_ids = [bos if the tokenizer adds one] + ids(segment_1) + ... + [eos]; truncated to
    max_seq_len. Supervised segments (and EOS) get their ids as labels, the rest IGNORE_INDEX (all
    tokens with train_on_inputs); labels[0] is IGNORE_INDEX.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no eos_token; set tokenizer.eos_token so examples can end")
    texts = [t for t, _ in segments]
    ids_per_segment = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    input_ids: list[int] = []
    labels: list[int] = []
    for (_, supervised), ids in zip(segments, ids_per_segment):
        input_ids += ids
        labels += ids if (supervised or train_on_inputs) else [IGNORE_INDEX] * len(ids)
    if not input_ids or input_ids[-1] != eos:
        input_ids.append(eos)
        labels.append(eos)
    if (_adds_bos(tokenizer) if adds_bos is None else adds_bos) and input_ids[0] != tokenizer.bos_token_id:
        input_ids.insert(0, tokenizer.bos_token_id)
        labels.insert(0, IGNORE_INDEX)
    truncated = len(input_ids) > max_seq_len
    input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
    labels[0] = IGNORE_INDEX  # never predicted (see the module docstring)
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


def build_examples(records: list[dict], tokenizer, cfg) -> tuple[list[dict], "DataStats"]:
    """Render and tokenize every row of `records` per `cfg` (a DataConfig).

    Returns examples {"input_ids": list[int], "labels": list[int]} and their DataStats (preference
    rows: pairs, data/preference.py build_pairs). A bad row is
    a DataError naming the row (1-based); rows with nothing supervised are dropped and counted.
    """
    fmt = detect_format(records, cfg.path) if cfg.format == "auto" else cfg.format
    if fmt == "preference":  # pairs for DPO / ORPO
        from .preference import build_pairs

        return build_pairs(records, tokenizer, cfg)
    stats = DataStats(n_rows=len(records), format=fmt)
    adds_bos = _adds_bos(tokenizer)  # once, not per row
    examples = []
    for i, record in enumerate(records):
        try:
            segments = render(record, fmt, tokenizer, cfg.template)
        except DataError as e:
            where = f"{cfg.path}: " if cfg.path else ""
            raise DataError(f"{where}row {i + 1} (format {fmt!r}): {e}") from None
        ex = tokenize_example(segments, tokenizer, cfg.max_seq_len, cfg.train_on_inputs, adds_bos)
        if ex is None:
            stats.n_dropped_no_supervision += 1
            continue
        stats.n_truncated += ex.pop("truncated")
        stats.n_tokens += len(ex["input_ids"])
        stats.n_supervised_tokens += sum(label != IGNORE_INDEX for label in ex["labels"])
        stats.lengths.append(len(ex["input_ids"]))
        examples.append(ex)
    stats.n_examples = len(examples)
    if not examples:
        raise DataError(
            f"{cfg.path or 'data'}: none of {len(records)} rows has a supervised token left after truncation "
            f"to data.max_seq_len={cfg.max_seq_len}; raise max_seq_len or shorten the prompts"
        )
    return examples, stats
