"""Preference pairs for DPO / ORPO: a prompt, a chosen and a rejected answer, tokenized side by side.

Row layouts (the `preference` format, detected from `chosen` and `rejected`):

  {"prompt": str, "chosen": str, "rejected": str}
      rendered as prompt_completion rows are (data.template: the tokenizer's chat template for an
      instruct model, else the plain prompt followed by the answer)
  {"chosen": [messages], "rejected": [messages]}                    (the common hub layout)
      two conversations that share every turn but the last assistant turn: the shared turns are the
      prompt, the last assistant turns the answers
  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}  (TRL's conversational layout)
      the prompt turns, then each side's assistant turn(s)

An example is {"input_ids", "labels"} of the chosen sequence (prompt + chosen answer + EOS) and
{"rejected_input_ids", "rejected_labels"} of the rejected one; the prompt tokens are the same on both
sides and never supervised (data.train_on_inputs does not apply), the answers and their EOS are.

Truncation, when prompt + the longer answer exceed max_seq_len (M): the answers keep their heads and
the prompt its tail (the end of a prompt is what the answer follows), with the answers given
max(M - prompt, min(longer answer, M // 2)) tokens and the prompt the rest; a leading BOS stays.
A truncated pair is counted in the stats (`lorakit data preview` shows them).
"""

from __future__ import annotations

from .formats import render, render_chat, _messages
from .sources import DataError
from .tokenize import IGNORE_INDEX, DataStats, _adds_bos, tokenize_example

FIELDS = ("prompt", "chosen", "rejected")


def render_pair(record: dict, tokenizer=None, template: str = "auto") -> tuple[list, list]:
    """(chosen segments, rejected segments) of one row; only each answer is supervised."""
    if not isinstance(record, dict):
        raise DataError(f"a row must be an object with named fields, got {type(record).__name__}")
    for name in ("chosen", "rejected"):
        if record.get(name) is None:
            raise DataError(f"missing field {name!r} required by format 'preference' (row has {sorted(record)}); "
                            "fields: prompt (a string or chat messages; optional with message lists), chosen, rejected")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise DataError("field 'prompt' must be a string when chosen and rejected are strings, got "
                            f"{type(prompt).__name__}")
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            if not answer.strip():
                raise DataError(f"field {name!r} is empty: an answer needs at least one non-blank character")
        _check_different(chosen, rejected)
        return tuple(render({"prompt": prompt, "completion": a}, "prompt_completion", tokenizer, template)
                     for a in (chosen, rejected))
    if isinstance(chosen, list) and isinstance(rejected, list):
        return _render_chats(prompt, chosen, rejected, tokenizer)
    raise DataError(f"fields 'chosen' and 'rejected' must both be strings or both lists of chat messages, got "
                    f"{type(chosen).__name__} and {type(rejected).__name__}")


def _render_chats(prompt, chosen: list, rejected: list, tokenizer) -> tuple[list, list]:
    if prompt is None:  # the shared turns are the prompt
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    elif not isinstance(prompt, list):
        raise DataError(f"field 'prompt' must be a list of chat messages when chosen and rejected are, got "
                        f"{type(prompt).__name__}")
    sides = []
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or any(not isinstance(m, dict) or m.get("role") != "assistant" for m in answer):
            raise DataError(f"field {name!r}: after the turns the two sides share, {name} must go on with assistant "
                            f"turns only, got roles {[m.get('role') if isinstance(m, dict) else m for m in answer]}"
                            + (" (chosen and rejected are the same conversation)" if not answer else ""))
        if not "".join(str(m.get("content", "")) for m in answer).strip():
            raise DataError(f"field {name!r}: the answer is empty")
        try:
            messages = _messages({"messages": list(prompt) + list(answer)})
        except DataError as e:
            raise DataError(f"field {name!r}: {e}") from None
        segments = render_chat(messages, tokenizer)
        # only the answer's turns are supervised: earlier assistant turns belong to the prompt
        sides.append(_supervise_last_turns(segments, len(answer)))
    _check_different(chosen, rejected)
    return sides[0], sides[1]


def _supervise_last_turns(segments: list, turns: int) -> list:
    """Segments with only the last `turns` supervised runs kept supervised."""
    runs, out, seen = 0, [], 0
    for i in range(len(segments) - 1, -1, -1):  # count supervised runs from the end
        if segments[i][1] and (i == len(segments) - 1 or not segments[i + 1][1]):
            runs += 1
    for i, (text, sup) in enumerate(segments):
        if sup and (i == 0 or not segments[i - 1][1]):
            seen += 1
        out.append((text, sup and seen > runs - turns))
    return out


def _check_different(chosen, rejected) -> None:
    if chosen == rejected:
        raise DataError("fields 'chosen' and 'rejected' are identical: a pair must prefer one answer over another")


def tokenize_pair(chosen_segments, rejected_segments, tokenizer, max_seq_len: int, adds_bos: bool) -> dict:
    """Both sides tokenized (tokenize.py's rules), split into the shared prompt and the answers, and
    truncated (module docstring). Adds "truncated" (bool) for the stats."""
    sides = [tokenize_example(s, tokenizer, 1 << 30, False, adds_bos) for s in (chosen_segments, rejected_segments)]
    if any(s is None for s in sides):
        raise DataError("an answer has no tokens")
    splits = [next(i for i, y in enumerate(s["labels"]) if y != IGNORE_INDEX) for s in sides]
    prompt = sides[0]["input_ids"][:splits[0]]
    if sides[1]["input_ids"][:splits[1]] != prompt:
        raise DataError("chosen and rejected do not start with the same prompt tokens (the chat template renders "
                        "the shared turns differently); check the rows' shared turns")
    answers = [(s["input_ids"][k:], s["labels"][k:]) for s, k in zip(sides, splits)]
    longest = max(len(ids) for ids, _ in answers)
    truncated = len(prompt) + longest > max_seq_len
    if truncated:
        budget = max(max_seq_len - len(prompt), min(longest, max_seq_len // 2))
        keep = max_seq_len - budget
        bos = prompt[:1] if adds_bos and prompt and prompt[0] == tokenizer.bos_token_id else []
        prompt = (bos + prompt[len(prompt) - keep + len(bos):]) if keep > len(bos) else prompt[:keep]
        answers = [(ids[:budget], labels[:budget]) for ids, labels in answers]
    out = {"truncated": truncated}
    for prefix, (ids, labels) in zip(("", "rejected_"), answers):
        out[prefix + "input_ids"] = prompt + ids
        out[prefix + "labels"] = [IGNORE_INDEX] * len(prompt) + labels
        out[prefix + "labels"][0] = IGNORE_INDEX  # never predicted (tokenize.py)
    return out


def build_pairs(records: list[dict], tokenizer, cfg) -> tuple[list[dict], DataStats]:
    """Every row as a pair (module docstring); a bad row is a DataError naming the file and row (1-based)."""
    stats = DataStats(n_rows=len(records), format="preference")
    adds_bos = _adds_bos(tokenizer)
    examples = []
    where = f"{cfg.path}: " if cfg.path else ""
    for i, record in enumerate(records):
        try:
            chosen, rejected = render_pair(record, tokenizer, cfg.template)
            ex = tokenize_pair(chosen, rejected, tokenizer, cfg.max_seq_len, adds_bos)
        except DataError as e:
            raise DataError(f"{where}row {i + 1} (format 'preference'): {e}") from None
        if all(y == IGNORE_INDEX for y in ex["labels"]) or all(y == IGNORE_INDEX for y in ex["rejected_labels"]):
            stats.n_dropped_no_supervision += 1
            continue
        stats.n_truncated += ex.pop("truncated")
        for prefix in ("", "rejected_"):
            stats.n_tokens += len(ex[prefix + "input_ids"])
            stats.n_supervised_tokens += sum(y != IGNORE_INDEX for y in ex[prefix + "labels"])
        stats.lengths.append(max(len(ex["input_ids"]), len(ex["rejected_input_ids"])))
        examples.append(ex)
    stats.n_examples = len(examples)
    if not examples:
        raise DataError(f"{cfg.path or 'data'}: none of {len(records)} pairs has an answer token left after "
                        f"truncation to data.max_seq_len={cfg.max_seq_len}")
    return examples, stats
