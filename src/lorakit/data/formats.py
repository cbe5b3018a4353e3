"""Row formats: detect which one a data set uses, and render a row into (text, supervised) segments.

Formats and their fields (required, then optional; an optional field may be missing, null or ""):

  chat               messages: [{role: system|user|assistant, content: str}, ...]
  dolly              instruction, response; context        (databricks-dolly-15k)
  alpaca             instruction, output; input            (tatsu-lab/alpaca)
  prompt_completion  prompt, completion
  text               text                                   (every token supervised)
  preference         chosen, rejected; prompt               (pairs for DPO / ORPO: data/preference.py)

A rendered row is a list of (text, supervised) segments. The prompt parts are unsupervised and
the response parts supervised; tokenize.py turns segments into ids and labels and appends EOS.
All prompt templates live in this file (PROMPT_TEMPLATE, CHATML).
"""

from __future__ import annotations

from typing import Optional

from .sources import DataError

# (required fields, optional fields) per format. Detection tries them in this order: the first
# format whose required fields are all present wins (chat before the others; dolly before alpaca
# since both have `instruction`, and each has its own response field).
FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "chat": (("messages",), ()),
    "dolly": (("instruction", "response"), ("context",)),
    "alpaca": (("instruction", "output"), ("input",)),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
    "preference": (("chosen", "rejected"), ("prompt",)),
}
FORMATS = tuple(FORMAT_FIELDS)

# The Alpaca prompt template (Taori et al., 2023, github.com/tatsu-lab/stanford_alpaca), shared by
# dolly and alpaca. The input section is left out when the row's context/input is empty.
# "alpaca_short" drops the one-sentence preamble: a third of the tokens for short rows, which
# matters on a CPU (the built-in demo uses it).
PROMPT_TEMPLATE = {
    "header": "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n",
    "with_input": ", paired with an input that provides further context",
    "instruction": "### Instruction:\n{instruction}\n\n",
    "input": "### Input:\n{input}\n\n",
    "response": "### Response:\n",
}

PROMPT_TEMPLATES = {"alpaca": PROMPT_TEMPLATE, "alpaca_short": {**PROMPT_TEMPLATE, "header": ""}}

# ChatML (OpenAI; the Qwen chat format), used when the tokenizer has no chat template of its own.
CHATML = {"start": "<|im_start|>{role}\n", "end": "<|im_end|>", "sep": "\n"}
CHAT_ROLES = ("system", "user", "assistant")

Segments = list[tuple[str, bool]]


def describe_formats() -> str:
    """'dolly (instruction, response, context?), ...' for error messages; ? marks optional fields."""
    parts = []
    for name, (req, opt) in FORMAT_FIELDS.items():
        parts.append(f"{name} ({', '.join(list(req) + [f + '?' for f in opt])})")
    return "; ".join(parts)


def detect_format(records: list[dict], source: str = "") -> str:
    """The format whose required fields the first row has (see FORMAT_FIELDS for the order)."""
    where = f"{source}: " if source else ""
    if not records:
        raise DataError(f"{where}no records to detect the format from")
    first = records[0]
    if not isinstance(first, dict):
        raise DataError(f"{where}row 1 is a {type(first).__name__}, not an object with named fields")
    for name, (required, _) in FORMAT_FIELDS.items():
        if all(f in first for f in required):
            return name
    raise DataError(
        f"{where}cannot detect the data format: row 1 has fields {sorted(first)}; "
        f"formats considered (fields, ? = optional): {describe_formats()}. "
        "Rename the fields, or set data.format explicitly."
    )


TEMPLATES = ("auto", "chat", *PROMPT_TEMPLATES)


def resolve_template(template: str, tokenizer=None) -> str:
    """data.template "auto": "chat" when the tokenizer has a chat template (an instruct model), else
    "alpaca"; any other name as it is (checked)."""
    if template not in TEMPLATES:
        raise DataError(f"data.template={template!r} is not allowed; choose one of {', '.join(TEMPLATES)}")
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    return template


def instruction_messages(instruction: str, context: str, response: Optional[str] = None) -> list[dict]:
    """A dolly / alpaca / prompt_completion row as chat turns: the instruction (and its context or
    input, after a blank line) as the user's turn, the answer as the assistant's."""
    user = instruction + (f"\n\n{context}" if context else "")
    return [{"role": "user", "content": user}] + ([] if response is None else [{"role": "assistant", "content": response}])


def format_prompt(instruction: str, context: str = "", template: str = "alpaca") -> str:
    """The Alpaca-style prompt up to and including '### Response:\\n'."""
    if template not in PROMPT_TEMPLATES:
        raise DataError(f"data.template={template!r} is not allowed; choose one of {', '.join(PROMPT_TEMPLATES)}")
    t = PROMPT_TEMPLATES[template]
    text = t["header"].format(with_input=t["with_input"] if context else "")
    text += t["instruction"].format(instruction=instruction)
    if context:
        text += t["input"].format(input=context)
    return text + t["response"]


def _field(record: dict, name: str, fmt: str, optional: bool = False) -> str:
    if name not in record or record[name] is None:
        if optional:
            return ""
        raise DataError(
            f"missing field {name!r} required by format {fmt!r} (row has {sorted(record)}); "
            f"formats considered (fields, ? = optional): {describe_formats()}"
        )
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"field {name!r} must be a string, got {type(value).__name__}: {value!r:.80}")
    return value


def render(record: dict, fmt: str, tokenizer=None, template: str = "alpaca") -> Segments:
    """One row as (text, supervised) segments. `tokenizer` is used by the chat format and the chat
    template, `template` (data.template) by dolly, alpaca and prompt_completion: "chat" renders them
    as one user and one assistant turn through the tokenizer's chat template (ChatML without one)."""
    if fmt not in FORMAT_FIELDS:
        raise DataError(f"data.format={fmt!r} is not allowed; choose one of {', '.join(FORMATS)}")
    if not isinstance(record, dict):
        raise DataError(f"a row must be an object with named fields, got {type(record).__name__}")
    if fmt == "preference":
        raise DataError("preference rows (prompt, chosen, rejected) train with train.objective dpo or orpo "
                        "(data/preference.py), not as single examples")
    if fmt == "chat":
        return render_chat(_messages(record), tokenizer)
    if fmt == "text":
        return [(_field(record, "text", fmt), True)]
    template = resolve_template(template, tokenizer)
    if fmt == "prompt_completion":
        prompt, completion = _field(record, "prompt", fmt), _field(record, "completion", fmt)
        if template == "chat":
            return render_chat(instruction_messages(prompt, "", completion), tokenizer)
        return [(prompt, False), (completion, True)]
    response_field = "response" if fmt == "dolly" else "output"
    input_field = "context" if fmt == "dolly" else "input"
    instruction = _field(record, "instruction", fmt)
    response = _field(record, response_field, fmt)
    context = _field(record, input_field, fmt, optional=True)
    if template == "chat":
        return render_chat(instruction_messages(instruction, context, response), tokenizer)
    prompt = format_prompt(instruction, context, template)
    return [(prompt, False), (response, True)]


def _messages(record: dict) -> list[dict]:
    messages = record.get("messages")
    if messages is None:
        _field(record, "messages", "chat")  # raises the missing-field error
    if not isinstance(messages, list) or not messages:
        raise DataError(f"field 'messages' must be a non-empty list of {{role, content}} objects, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"messages[{i}] must be an object with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"messages[{i}].role={m['role']!r} is not allowed; choose one of {', '.join(CHAT_ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"messages[{i}].content must be a string, got {type(m['content']).__name__}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("chat has no assistant turn, so nothing would be trained; roles: "
                        + ", ".join(m["role"] for m in messages))
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render_chat(messages: list[dict], tokenizer=None) -> Segments:
    """Assistant turns supervised (content + end-of-turn marker), everything else not.

    Messages after the last assistant turn carry no supervision and are left out, so the row ends
    with the last assistant's end-of-turn marker (tokenize.py then appends EOS unless the marker
    already is EOS).
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last + 1]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return _render_with_template(messages, tokenizer)
    return _render_chatml(messages)


def _render_chatml(messages: list[dict]) -> Segments:
    segments: Segments = []
    for i, m in enumerate(messages):
        sep = CHATML["sep"] if i < len(messages) - 1 else ""  # no trailing newline after the last turn
        if m["role"] == "assistant":
            segments += [(CHATML["start"].format(role="assistant"), False), (m["content"], True),
                         (CHATML["end"], True)]
            if sep:
                segments.append((sep, False))
        else:
            segments.append((CHATML["start"].format(role=m["role"]) + m["content"] + CHATML["end"] + sep, False))
    return _merge(segments)


def _render_with_template(messages: list[dict], tokenizer) -> Segments:
    """Render prefix by prefix and diff the strings.

    For assistant turn i:  before = render(messages[:i]),  prompt = render(messages[:i],
    add_generation_prompt=True),  full = render(messages[:i+1]).  prompt[len(before):] is the
    assistant header (unsupervised, exactly what inference appends), full[len(prompt):] is the
    turn (supervised). The template must render each prefix as a prefix of the next.
    """
    def text(msgs, gen=False):
        if not msgs and not gen:
            return ""
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    segments: Segments = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = text(messages[:i], gen=True), text(messages[: i + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError(
                "the tokenizer's chat template does not render a conversation incrementally (a prefix of "
                "the messages is not a prefix of the text), so assistant turns cannot be located; "
                "use a template that does, or remove tokenizer.chat_template to use ChatML"
            )
        segments.append((prompt[len(done):], False))
        segments += _split_turn(full[len(prompt):], m["content"])
        done = full
    if not segments[-1][1]:
        segments.pop()  # whitespace after the last turn's end marker: the row ends at the marker
    return _merge(segments)


def _split_turn(turn: str, content: str) -> Segments:
    """Supervised: the content and the end-of-turn marker; trailing whitespace after the marker is not."""
    body = turn.rstrip()
    tail = turn[len(body):]
    out: Segments = []
    for c in (content, content.strip()):
        if c and body.startswith(c):
            # content and marker tokenized separately: the content's ids equal tokenize(content)
            out = [(c, True), (body[len(c):], True)]
            break
    out = out or [(body, True)]
    if tail:
        out.append((tail, False))
    return [s for s in out if s[0]]


def _merge(segments: Segments) -> Segments:
    """Join neighbouring unsupervised segments (supervised ones stay apart: tokenized one by one)."""
    out: Segments = []
    for text, sup in segments:
        if not text:
            continue
        if out and not sup and not out[-1][1]:
            out[-1] = (out[-1][0] + text, False)
        else:
            out.append((text, sup))
    return out
