"""Tokenization and label masking: exactly the response tokens + EOS are supervised."""

import pytest

from lorakit.config import DataConfig
from lorakit.data import (IGNORE_INDEX, DataError, build_examples, collate, preview, render, stats_text,
                          tokenize_example)

KINDS = ["plain", "pad_eos", "chatml", "llama"]

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Paris is the capital."},
    {"role": "user", "content": "Tell me a joke"},
    {"role": "assistant", "content": "cats and dogs"},
]


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def supervised_ids(ex):
    return [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX]


def check_alignment(ex):
    assert len(ex["input_ids"]) == len(ex["labels"])
    assert all(label in (tok_id, IGNORE_INDEX) for tok_id, label in zip(ex["input_ids"], ex["labels"]))
    assert ex["labels"][0] == IGNORE_INDEX


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt,row,response", [
    ("dolly", {"instruction": "What is the capital of France?", "context": "Europe", "response": "Paris is the capital."}, "Paris is the capital."),
    ("alpaca", {"instruction": "Tell me a joke", "input": "", "output": " cats and dogs"}, " cats and dogs"),
    # joint tokenization would merge "as" + "sistant" into "assistant": separate segments keep it exact
    ("prompt_completion", {"prompt": "You are a helpful as", "completion": "sistant"}, "sistant"),
])
def test_supervised_ids_are_response_plus_eos(tokenizers_by_kind, kind, fmt, row, response):
    tok = tokenizers_by_kind(kind)
    ex = tokenize_example(render(row, fmt, tok), tok, max_seq_len=512, train_on_inputs=False)
    check_alignment(ex)
    assert supervised_ids(ex) == ids(tok, response) + [tok.eos_token_id]
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["labels"][-1] == tok.eos_token_id
    assert ex["truncated"] is False


def test_segments_are_tokenized_separately(tok_plain):
    # the premise of the prompt_completion case above: the tokenizer does merge across the boundary
    prompt, response = "You are a helpful as", "sistant"
    assert ids(tok_plain, prompt + response) != ids(tok_plain, prompt) + ids(tok_plain, response)
    ex = tokenize_example([(prompt, False), (response, True)], tok_plain, 512, False)
    assert ex["input_ids"] == ids(tok_plain, prompt) + ids(tok_plain, response) + [tok_plain.eos_token_id]


@pytest.mark.parametrize("kind", KINDS)
def test_text_format_supervises_everything_but_the_first_token(tokenizers_by_kind, kind):
    tok = tokenizers_by_kind(kind)
    ex = tokenize_example(render({"text": "The quick brown fox"}, "text", tok), tok, 512, False)
    check_alignment(ex)
    expected = ([tok.bos_token_id] if kind == "llama" else []) + ids(tok, "The quick brown fox") + [tok.eos_token_id]
    assert ex["input_ids"] == expected
    assert ex["labels"] == [IGNORE_INDEX] + expected[1:]


@pytest.mark.parametrize("kind", KINDS)
def test_chat_supervises_only_assistant_turns(tokenizers_by_kind, kind):
    tok = tokenizers_by_kind(kind)
    ex = tokenize_example(render({"messages": CHAT}, "chat", tok), tok, 512, False)
    check_alignment(ex)
    end = "<|end|>" if kind == "llama" else "<|im_end|>"  # llama: its template; others: (fallback) ChatML
    expected = []
    for content in ("Paris is the capital.", "cats and dogs"):
        expected += ids(tok, content) + ids(tok, end)
    if tok.eos_token != end:  # the end-of-turn marker is not EOS: EOS is appended after the last turn
        expected.append(tok.eos_token_id)
    assert supervised_ids(ex) == expected
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["labels"][-1] == tok.eos_token_id
    decoded = tok.decode(ex["input_ids"])
    assert decoded.count("You are a helpful assistant.") == 1  # system prompt present, unsupervised


@pytest.mark.parametrize("kind", ["llama", "plain"])
def test_bos_exactly_once(tokenizers_by_kind, kind):
    tok = tokenizers_by_kind(kind)
    for fmt, row in [("chat", {"messages": CHAT}), ("text", {"text": "hello"})]:
        ex = tokenize_example(render(row, fmt, tok), tok, 512, False)
        n_bos = ex["input_ids"].count(tok.bos_token_id)
        assert n_bos == (1 if kind == "llama" else 0)
        if kind == "llama":
            assert ex["input_ids"][0] == tok.bos_token_id


def test_eos_supervised_when_pad_equals_eos(tok_pad_eos):
    tok = tok_pad_eos
    assert tok.pad_token_id == tok.eos_token_id
    short = tokenize_example([("Hi", False), ("yes", True)], tok, 512, False)
    long = tokenize_example([("Hello there my friend", False), ("no thanks", True)], tok, 512, False)
    assert short["labels"][-1] == tok.eos_token_id
    batch = collate([short, long], pad_id=tok.pad_token_id)
    n = len(short["input_ids"])
    assert batch["labels"][0, n - 1].item() == tok.eos_token_id  # EOS supervised...
    assert (batch["input_ids"][0, n:] == tok.eos_token_id).all()  # ...padding looks the same...
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()  # ...but is not supervised
    assert (batch["attention_mask"][0, n:] == 0).all() and (batch["attention_mask"][0, :n] == 1).all()


def test_train_on_inputs(tok_plain):
    row = {"instruction": "What is the capital of France?", "response": "Paris"}
    ex = tokenize_example(render(row, "dolly"), tok_plain, 512, train_on_inputs=True)
    assert ex["labels"] == [IGNORE_INDEX] + ex["input_ids"][1:]


def test_truncation_and_drop(tok_plain):
    segs = render({"prompt": "The quick brown fox jumps over the lazy dog.", "completion": " Hello world"}, "prompt_completion")
    full = tokenize_example(segs, tok_plain, 512, False)
    n_prompt = len(ids(tok_plain, segs[0][0]))
    cut = tokenize_example(segs, tok_plain, n_prompt + 1, False)
    assert cut["truncated"] and cut["input_ids"] == full["input_ids"][: n_prompt + 1]
    assert supervised_ids(cut) == full["input_ids"][n_prompt: n_prompt + 1]  # first response token only
    assert tokenize_example(segs, tok_plain, n_prompt, False) is None  # nothing supervised left


def test_build_examples_stats(tok_plain):
    records = [
        {"instruction": "What is the capital of France?", "context": "", "response": "Paris"},
        {"instruction": "Tell me a joke " * 40, "context": "", "response": "cats"},  # prompt fills max_seq_len
        {"instruction": "Hello", "context": "Europe", "response": "Hello world " * 60},  # truncated
    ]
    cfg = DataConfig(path="mem.jsonl", max_seq_len=128)
    examples, stats = build_examples(records, tok_plain, cfg)
    assert stats.format == "dolly" and stats.n_rows == 3
    assert stats.n_examples == len(examples) == 2 and stats.n_dropped_no_supervision == 1
    assert stats.n_truncated == 1
    assert stats.lengths == [len(e["input_ids"]) for e in examples] and max(stats.lengths) == 128
    assert stats.n_tokens == sum(stats.lengths)
    assert stats.n_supervised_tokens == sum(len(supervised_ids(e)) for e in examples)
    assert set(examples[0]) == {"input_ids", "labels"}
    text = stats_text(stats)
    assert "rows: 3  examples: 2" in text and f"max {max(stats.lengths)}" in text
    assert "truncated to max_seq_len: 1" in text and "dropped (no supervised token left): 1" in text


def test_build_examples_explicit_format_and_row_errors(tok_plain):
    records = [{"prompt": "a", "completion": "b"}, {"prompt": "a"}]
    with pytest.raises(DataError, match=r"train\.jsonl: row 2 \(format 'prompt_completion'\): missing field 'completion'"):
        build_examples(records, tok_plain, DataConfig(path="train.jsonl"))
    with pytest.raises(DataError, match=r"row 1 \(format 'text'\): missing field 'text'"):
        build_examples(records, tok_plain, DataConfig(format="text"))


def test_all_rows_dropped_is_an_error(tok_plain):
    records = [{"prompt": "The quick brown fox jumps over the lazy dog.", "completion": "x"}]
    with pytest.raises(DataError, match="max_seq_len=8"):
        build_examples(records, tok_plain, DataConfig(max_seq_len=8))


def test_tokenizer_without_eos(tokenizers_by_kind):
    tok = tokenizers_by_kind("plain")
    tok.eos_token = None
    with pytest.raises(DataError, match="no eos_token"):
        tokenize_example([("a", True)], tok, 512, False)


def test_preview_marks_supervised_spans(tok_plain):
    records = [{"instruction": "What is the capital of France?", "response": "Paris"},
               {"instruction": "Tell me a joke", "response": "cats and dogs"}]
    examples, _ = build_examples(records, tok_plain, DataConfig())
    text = preview(examples, tok_plain, n=1)
    assert "[[Paris</s>]]" in text and "cats" not in text
    body = text.split("\n", 1)[1]  # after the legend line
    assert body.count("[[") == body.count("]]") == 1 and "### Response:\n[[" in body
    colored = preview(examples, tok_plain, n=2, color=True)
    assert "\033[32mcats and dogs</s>\033[0m" in colored and "[[" not in colored
