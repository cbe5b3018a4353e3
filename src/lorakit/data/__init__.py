"""Data pipeline: read -> format (dolly / alpaca / chat / prompt_completion / text) -> tokenize + mask
-> pack / collate. See each module's docstring for the exact conventions."""

from .batches import Batches
from .collate import block_causal_mask, collate, collate_packed, pack_examples, sequence_ids
from .formats import CHATML, FORMAT_FIELDS, FORMATS, PROMPT_TEMPLATE, detect_format, format_prompt, render
from .preview import mark_supervised, preview, stats_text
from .sources import DataError, load_records, split_records
from .tokenize import IGNORE_INDEX, DataStats, build_examples, pad_token_id, tokenize_example

__all__ = [
    "Batches", "CHATML", "FORMAT_FIELDS", "FORMATS", "IGNORE_INDEX", "PROMPT_TEMPLATE", "DataError", "DataStats",
    "block_causal_mask", "build_examples", "collate", "collate_packed", "detect_format", "format_prompt",
    "load_records", "mark_supervised", "pack_examples", "pad_token_id", "preview", "render", "sequence_ids", "split_records",
    "stats_text", "tokenize_example",
]
