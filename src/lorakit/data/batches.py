"""The deterministic micro-batch stream of a run: "data position = step".

The rows (examples, or packed rows) form one continuous stream of micro-batches; epoch e visits
them in the order of a permutation seeded by (seed, e). Micro-batch k of the stream is rows
k*mbs ... (k+1)*mbs - 1 of its epoch's order (the last one of an epoch may be shorter), so any
micro-batch can be rebuilt from its index alone: a resumed run sees exactly the batches an
uninterrupted one would, and a checkpoint needs no sampler state. `Batches` is map-style
(`__getitem__`, `__len__` = micro-batches per epoch), so it also works as a DataLoader dataset
with batch_size=None.

On W ranks (train/distributed.py) micro-batch k of the stream is rows k*m*W ... (k+1)*m*W - 1 (the
global micro-batch one process with micro-batch m*W would see) and rank r takes its slice
r*m ... (r+1)*m - 1 of them. Every rank runs the same number of micro-batches: a rank whose slice of
a short last batch is empty gets a stand-in row with nothing supervised (loss 0, no gradient), so
the collectives of every rank stay in step.

A row is an example, a packed row, or a preference pair (DPO / ORPO), which collates into its
chosen and its rejected sequence (data/collate.py collate_pairs; a stand-in pair counts 0).
"""

from __future__ import annotations

import math

import torch

from .collate import collate, collate_packed, collate_pairs, pack_examples
from .tokenize import IGNORE_INDEX


class Batches:
    """Micro-batch `index` of the stream over `examples` (module docstring), collated with `pad_id`."""

    def __init__(self, examples: list[dict], micro_batch_size: int, seed: int, pad_id: int,
                 pack: bool = False, max_seq_len: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.rows = pack_examples(examples, max_seq_len) if pack else examples
        pairs = bool(examples) and "rejected_input_ids" in examples[0]  # preference pairs (DPO / ORPO)
        self.collate = collate_packed if pack else collate_pairs if pairs else collate
        self.mbs, self.seed, self.pad_id, self.shuffle = micro_batch_size, seed, pad_id, shuffle
        self.rank, self.world_size = rank, world_size
        self.per_epoch = math.ceil(len(self.rows) / (micro_batch_size * world_size))
        self._order: dict[int, list[int]] = {}

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._order:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._order = {epoch: torch.randperm(len(self.rows), generator=g).tolist()}
            else:
                self._order = {epoch: list(range(len(self.rows)))}
        return self._order[epoch]

    def __getitem__(self, index: int) -> dict:
        epoch, i = divmod(index, self.per_epoch)
        order = self._epoch_order(epoch)
        rows = self.mbs * self.world_size                                   # one global micro-batch
        ids = order[i * rows:(i + 1) * rows][self.rank * self.mbs:(self.rank + 1) * self.mbs]
        if not ids:  # this rank's share of a short last batch: a stand-in with nothing supervised
            row = dict(self.rows[order[0]])
            for key in ("labels", "rejected_labels"):
                if key in row:
                    row[key] = [IGNORE_INDEX] * len(row[key])
            return self.collate([row], self.pad_id)
        return self.collate([self.rows[j] for j in ids], self.pad_id)

    def __len__(self) -> int:
        return self.per_epoch
