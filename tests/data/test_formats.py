"""Format detection and rendering into (text, supervised) segments."""

import pytest

from lorakit.data import CHATML, DataError, detect_format, format_prompt, render
from lorakit.data.formats import FORMAT_FIELDS

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": " Paris is the capital. "},
    {"role": "user", "content": "Tell me a joke"},
    {"role": "assistant", "content": "cats and dogs"},
]

ROWS = {
    "dolly": {"instruction": "What is the capital of France?", "context": "Europe", "response": "Paris"},
    "alpaca": {"instruction": "What is the capital of France?", "input": "", "output": "Paris"},
    "chat": {"messages": CHAT},
    "prompt_completion": {"prompt": "Hello wor", "completion": "ld"},
    "text": {"text": "The quick brown fox"},
}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_detect_each_format(fmt):
    assert detect_format([ROWS[fmt], {"anything": 1}]) == fmt


def test_detect_prefers_by_declared_order():
    # a row with both alpaca and text fields is alpaca; chat wins over everything
    assert detect_format([{"instruction": "a", "output": "b", "text": "c"}]) == "alpaca"
    assert detect_format([{"messages": [], "text": "c"}]) == "chat"


def test_detect_failure_lists_formats_and_fields():
    with pytest.raises(DataError) as e:
        detect_format([{"question": "q", "answer": "a"}], source="qa.jsonl")
    msg = str(e.value)
    assert "qa.jsonl" in msg and "['answer', 'question']" in msg
    for name, (req, opt) in FORMAT_FIELDS.items():
        assert name in msg
        assert all(f in msg for f in req + opt)
    assert "data.format" in msg


def test_prompt_template_omits_empty_input():
    with_input = format_prompt("Do X", "some context")
    without = format_prompt("Do X", "")
    assert "### Input:\nsome context\n\n" in with_input and "### Input" not in without
    assert with_input.endswith("### Response:\n") and without.endswith("### Response:\n")
    assert "### Instruction:\nDo X\n\n### Input:" in with_input
    assert "### Instruction:\nDo X\n\n### Response:\n" in without


@pytest.mark.parametrize("fmt,response", [("dolly", "Paris"), ("alpaca", "Paris"), ("prompt_completion", "ld")])
def test_render_prompt_response(fmt, response):
    segs = render(ROWS[fmt], fmt)
    assert segs[-1] == (response, True)
    assert all(not sup for _, sup in segs[:-1])


def test_dolly_and_alpaca_share_the_template():
    dolly = render({"instruction": "I", "context": "C", "response": "R"}, "dolly")
    alpaca = render({"instruction": "I", "input": "C", "output": "R"}, "alpaca")
    assert dolly == alpaca == [(format_prompt("I", "C"), False), ("R", True)]
    # missing / null optional field == empty
    assert render({"instruction": "I", "response": "R"}, "dolly") == render(
        {"instruction": "I", "context": None, "response": "R"}, "dolly") == [(format_prompt("I"), False), ("R", True)]


def test_text_is_fully_supervised():
    assert render(ROWS["text"], "text") == [("The quick brown fox", True)]


def test_missing_field_names_it_and_lists_formats():
    with pytest.raises(DataError) as e:
        render({"instruction": "I", "context": ""}, "dolly")
    msg = str(e.value)
    assert "missing field 'response' required by format 'dolly'" in msg
    assert "alpaca (instruction, output, input?)" in msg and "chat (messages)" in msg


@pytest.mark.parametrize("row,fmt,field", [({"text": 3}, "text", "text"),
                                            ({"prompt": "p", "completion": ["x"]}, "prompt_completion", "completion"),
                                            ({"instruction": "i", "context": 5, "response": "r"}, "dolly", "context")])
def test_non_string_field(row, fmt, field):
    with pytest.raises(DataError, match=f"field '{field}' must be a string"):
        render(row, fmt)


def test_unknown_format():
    with pytest.raises(DataError, match="data.format='sharegpt' is not allowed; choose one of chat, dolly"):
        render({"text": "x"}, "sharegpt")


@pytest.mark.parametrize("messages,match", [
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "human", "content": "hi"}, {"role": "assistant", "content": "a"}],
     r"messages\[0\]\.role='human' is not allowed; choose one of system, user, assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 1}], r"messages\[1\]\.content must be a string"),
    ([{"role": "user"}], r"messages\[0\] must be an object with 'role' and 'content'"),
    ([], "non-empty list"),
    ("hello", "non-empty list"),
])
def test_bad_chats(messages, match):
    with pytest.raises(DataError, match=match):
        render({"messages": messages}, "chat")


def test_chatml_fallback_matches_a_chatml_jinja_template(tok_plain, tok_chatml):
    """Our Python ChatML (tokenizer without a template) == the ChatML jinja template in conftest."""
    assert not tok_plain.chat_template
    segs = render(ROWS["chat"], "chat", tok_plain)
    assert "".join(t for t, _ in segs) == tok_chatml.apply_chat_template(CHAT, tokenize=False).rstrip()
    assert [t for t, s in segs if s] == [" Paris is the capital. ", CHATML["end"], "cats and dogs", CHATML["end"]]


@pytest.mark.parametrize("kind", ["chatml", "llama"])
def test_template_segments_rebuild_the_template_text(tokenizers_by_kind, kind):
    tok = tokenizers_by_kind(kind)
    messages = CHAT + [{"role": "user", "content": "trailing question, not trained"}]
    segs = render({"messages": messages}, "chat", tok)
    # everything up to the last assistant turn, without the whitespace after its end marker
    assert "".join(t for t, _ in segs) == tok.apply_chat_template(CHAT, tokenize=False).rstrip()
    supervised = [t for t, s in segs if s]
    end = "<|im_end|>" if kind == "chatml" else "<|end|>"
    contents = [" Paris is the capital. ", "cats and dogs"] if kind == "chatml" else ["Paris is the capital.", "cats and dogs"]
    assert supervised == [contents[0], end, contents[1], end]
    # the assistant header (what add_generation_prompt appends) is not supervised
    header = "<|im_start|>assistant\n" if kind == "chatml" else "<|assistant|>\n"
    assert all(not s for t, s in segs if header in t)


def test_non_incremental_template_is_an_error(tokenizers_by_kind):
    tok = tokenizers_by_kind("plain")
    # renders the conversation length first: prefixes do not stay prefixes
    tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match="does not render a conversation incrementally"):
        render({"messages": CHAT}, "chat", tok)


def test_instruction_rows_through_the_models_chat_template():
    from lorakit.data.formats import render, resolve_template
    from lorakit.recipes.generate import prompt_and_answer

    from tiny_tokenizers import make_tokenizer

    chat_tok, plain_tok = make_tokenizer("chatml"), make_tokenizer("plain")
    row = {"instruction": "Name a cat.", "context": "Pets", "response": "Tom"}
    segments = render(row, "dolly", chat_tok, "chat")
    text = "".join(t for t, _ in segments)
    want = chat_tok.apply_chat_template([{"role": "user", "content": "Name a cat.\n\nPets"},
                                         {"role": "assistant", "content": "Tom"}], tokenize=False)
    assert want.startswith(text) and [t for t, sup in segments if sup] == ["Tom", "<|im_end|>"]
    assert resolve_template("auto", chat_tok) == "chat" and resolve_template("auto", plain_tok) == "alpaca"
    assert render(row, "dolly", chat_tok, "auto") == segments  # auto: the model's own template
    assert render(row, "dolly", plain_tok, "auto") == render(row, "dolly", plain_tok, "alpaca")
    prompt, answer = prompt_and_answer(row, "dolly", chat_tok, "auto")
    assert answer == "Tom" and prompt.endswith("<|im_start|>assistant\n")
    pc = render({"prompt": "2+2=", "completion": "4"}, "prompt_completion", chat_tok, "chat")
    assert [t for t, sup in pc if sup][0] == "4"


def test_generate_and_eval_use_the_template_the_adapter_was_trained_with(tmp_path):
    from lorakit.recipes.generate import trained_template

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "run_config.yaml").write_text("data:\n  template: alpaca_short\n")
    assert trained_template(str(run / "adapter"), "raw") == "alpaca_short"
    assert trained_template(str(tmp_path / "elsewhere"), "raw") == "raw" and trained_template(None, "auto") == "auto"
