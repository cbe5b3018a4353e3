"""Batch examples into tensors: right-padded batches, or packed rows.

Unpacked: `collate` right-pads to the longest example (optionally to a multiple of 8 for tensor
cores) and returns input_ids, labels and a 2D attention_mask.

Packed: `pack_examples` concatenates whole examples greedily, in order, into rows of at most
max_seq_len tokens; `collate_packed` returns input_ids, labels and position_ids, and deliberately
NO attention_mask. Call the model as

    model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)

Why (transformers 5.x, masking_utils.py): `_preprocess_mask_arguments` runs
`find_packed_sequence_indices(position_ids)` only when attention_mask is None AND there is no
cache; a position that is not its left neighbour + 1 starts a new sequence, and
`create_causal_mask` then ANDs the causal mask with "same sequence" for every implementation that
builds a mask (sdpa, eager, flex); flash-attention turns the same position_ids into cu_seqlens.
RoPE uses the restarted positions. So each example sees exactly what it would see alone, at O(L)
memory instead of the O(L^2) of a 4D mask. Two ways to silently break it, both shown in the tests:
  - a 2D attention_mask switches the detection off (leaving it out of the batch makes a caller that
    expects one fail with KeyError instead);
  - use_cache: the model reads it from config.use_cache (True for most checkpoints, also in train
    mode), builds a DynamicCache, and the detection is off again. Training wants use_cache=False.
Padding at the end of a packed row gets positions 0, 1, ... so it forms its own block.

`block_causal_mask` builds the equivalent 4D additive mask (0 / dtype min, as transformers'
eager_mask) for models or versions that do not detect packing: a 4D mask is passed through as-is
for sdpa and eager, cache or not. Build it in the compute dtype (as transformers does), and never
as bool: eager adds the mask to the scores, so True/False would add 1/0 and mask nothing.
"""

from __future__ import annotations

import torch

from .tokenize import IGNORE_INDEX


def _round_up(n: int, multiple: int) -> int:
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"pad_to_multiple_of={multiple!r} is not allowed; use an integer >= 1")
    return -(-n // multiple) * multiple


def collate(examples: list[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad a list of {"input_ids", "labels"} to [B, L] tensors.

    L = the longest example, rounded up to pad_to_multiple_of. Padding: input_ids = pad_id,
    labels = IGNORE_INDEX, attention_mask = 0 (whatever pad_id is, even eos).
    """
    if not examples:
        raise ValueError("collate() got no examples")
    input_ids, labels = _pad_ids_and_labels(examples, pad_id, pad_to_multiple_of)  # [B, L] each
    attention_mask = torch.zeros_like(input_ids)  # [B, L]
    for b, e in enumerate(examples):
        attention_mask[b, :len(e["input_ids"])] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_pairs(pairs: list[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Preference pairs (data/preference.py) -> one batch of 2B rows, chosen first, rejected after:

        input_ids, labels, attention_mask [2B, L]   rows 0..B-1 chosen, B..2B-1 rejected (as collate)
        pairs [B] bool                              both answers have a supervised token (a pair that counts)
        ref_logps [2B] fp32                         when the pairs carry precomputed reference log-probs
    """
    if not pairs:
        raise ValueError("collate_pairs() got no pairs")
    sides = [{"input_ids": p["input_ids"], "labels": p["labels"]} for p in pairs] + \
            [{"input_ids": p["rejected_input_ids"], "labels": p["rejected_labels"]} for p in pairs]
    batch = collate(sides, pad_id, pad_to_multiple_of)
    supervised = (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=1)                 # [2B]
    batch["pairs"] = supervised[:len(pairs)] & supervised[len(pairs):]               # [B]
    if "ref_logps" in pairs[0]:
        batch["ref_logps"] = torch.tensor([p["ref_logps"][0] for p in pairs] + [p["ref_logps"][1] for p in pairs],
                                          dtype=torch.float32)                       # [2B]
    return batch


def _pad_ids_and_labels(rows: list[dict], pad_id: int, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids (pad_id) and labels (IGNORE_INDEX), both [B, L] with L the longest
    row rounded up to `multiple`."""
    length = _round_up(max(len(r["input_ids"]) for r in rows), multiple)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # [B, L]
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)  # [B, L]
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(r["labels"], dtype=torch.long)
    return input_ids, labels


def pack_examples(examples: list[dict], max_seq_len: int) -> list[dict]:
    """Greedily concatenate whole examples, in order, into rows of at most max_seq_len tokens.

    Each row: input_ids, labels, position_ids (restarting at 0 per example) and seq_lens. The
    first label of every example is IGNORE_INDEX, so no example's first token is predicted from the
    previous example's last token. Examples longer than max_seq_len are an error (truncate first).
    """
    if not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len={max_seq_len!r} is not allowed; use an integer >= 1")
    rows: list[dict] = []
    row = _new_row()
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        if n > max_seq_len:
            raise ValueError(f"example {i} has {n} tokens > max_seq_len={max_seq_len}; truncate before packing")
        if n == 0:
            continue
        if sum(row["seq_lens"]) + n > max_seq_len:
            rows.append(row)
            row = _new_row()
        row["input_ids"] += e["input_ids"]
        row["labels"] += [IGNORE_INDEX] + list(e["labels"][1:])
        row["position_ids"] += list(range(n))
        row["seq_lens"].append(n)
    if row["seq_lens"]:
        rows.append(row)
    return rows


def _new_row() -> dict:
    return {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}


def collate_packed(rows: list[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Packed rows -> input_ids, labels, position_ids [B, L]; no attention_mask (see module docstring).

    Padding: input_ids = pad_id, labels = IGNORE_INDEX, position_ids = 0, 1, 2, ... (its own block).
    """
    if not rows:
        raise ValueError("collate_packed() got no rows")
    input_ids, labels = _pad_ids_and_labels(rows, pad_id, pad_to_multiple_of)  # [B, L] each
    length = input_ids.shape[1]
    position_ids = torch.zeros_like(input_ids)  # [B, L]
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        position_ids[b, :n] = torch.tensor(r["position_ids"], dtype=torch.long)
        position_ids[b, n:] = torch.arange(length - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] position_ids -> [B, L] index of the packed sequence each token belongs to.

    A new sequence starts wherever the position is not its left neighbour + 1 (the same rule as
    transformers' find_packed_sequence_indices).
    """
    first = position_ids[:, :1] - 1  # [B, 1]: makes the first token continue "nothing"
    starts = torch.diff(position_ids, prepend=first, dim=-1) != 1  # [B, L]
    return starts.long().cumsum(-1)  # [B, L]


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, L] position_ids -> [B, 1, L, L] additive mask: 0 where query q may attend to key k
    (same sequence and k <= q), dtype's most negative value elsewhere (as transformers' eager_mask).
    """
    seq = sequence_ids(position_ids)  # [B, L]
    length = position_ids.shape[1]
    same = seq[:, :, None] == seq[:, None, :]  # [B, L, L]: [b, q, k]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()  # [L, L]
    allowed = (same & causal)[:, None]  # [B, 1, L, L]
    zero = torch.zeros((), dtype=dtype, device=position_ids.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)  # [B, 1, L, L]
