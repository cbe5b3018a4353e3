"""The shipped demo assets (scripts/make_demo_assets.py) load with plain transformers, offline,
and the demo task is one the base model cannot do yet while it does its pre-training tasks."""

import json
from pathlib import Path

import pytest
import torch

import lorakit

DEMO = Path(lorakit.__file__).parent / "assets" / "demo"
MODEL = DEMO / "model"
MAX_BYTES = 20 * 1024 * 1024  # the demo model folder must stay under 20 MiB (package size)
FIELDS = {"instruction", "context", "response"}  # dolly-15k row layout


def render(instruction: str, context: str) -> str:
    """The alpaca-style prompt lorakit renders dolly rows with (Input omitted when empty)."""
    if context:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def read_rows(name: str) -> list[dict]:
    with open(DEMO / name) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(MODEL, local_files_only=True, dtype=torch.float32)
    return model.eval(), tok


@torch.no_grad()
def greedy_answers(model, tok, prompts: list[str], max_new_tokens: int = 16) -> list[str]:
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    new = out[:, enc["input_ids"].shape[1]:]  # [batch, generated]
    return [tok.decode(row, skip_special_tokens=True).strip() for row in new]


def test_model_folder_is_small_and_safetensors_only():
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    names = {p.name for p in files}
    assert "model.safetensors" in names and "config.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)


def test_loads_offline_as_llama(model_and_tokenizer):
    model, tok = model_and_tokenizer
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert cfg.vocab_size == len(tok)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == \
        (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3


def test_splits_are_dolly_rows_disjoint_and_large_enough():
    train, test = read_rows("train.jsonl"), read_rows("test.jsonl")
    assert len(train) >= 1000 and len(test) >= 100
    for row in train + test:
        assert set(row) == FIELDS
        assert all(isinstance(row[k], str) for k in FIELDS)
        assert row["instruction"] and row["response"]
    assert not {r["context"] for r in train} & {r["context"] for r in test}
    assert len({r["context"] for r in test}) == len(test)


def parse_record(context: str) -> dict:
    return dict(field.split(": ") for field in context.split(", "))


def test_task_is_record_to_sentence():
    train, test = read_rows("train.jsonl"), read_rows("test.jsonl")
    for row in train + test:
        rec = parse_record(row["context"])
        assert list(rec) == ["name", "city", "pet", "color"]
        assert row["response"] == f"{rec['name']} lives in {rec['city']}."
    assert not {r["response"] for r in train} & {r["response"] for r in test}


def test_tokenizer_round_trips_and_adds_bos(model_and_tokenizer):
    _, tok = model_and_tokenizer
    row = read_rows("test.jsonl")[0]
    text = render(row["instruction"], row["context"]) + row["response"]
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok(row["response"])["input_ids"]) <= 16  # short answers: fast greedy decoding
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == tok.bos_token + render("hi", "")


def test_base_model_knows_its_world_but_not_the_demo_task(model_and_tokenizer):
    model, tok = model_and_tokenizer
    rows = read_rows("test.jsonl")[:30]
    answers = greedy_answers(model, tok, [render(r["instruction"], r["context"]) for r in rows])
    base_em = sum(a == r["response"] for a, r in zip(answers, rows)) / len(rows)
    assert base_em <= 0.20
    # Pre-training tasks over the same records: the base model is a trained LM, not random weights,
    # and it has the two look-ups the demo task composes.
    for question, field in (("Where does the person live?", "city"),
                            ("What is the name of the person?", "name")):
        looked_up = greedy_answers(model, tok, [render(question, r["context"]) for r in rows])
        hits = sum(a == parse_record(r["context"])[field] for a, r in zip(looked_up, rows))
        assert hits / len(rows) >= 0.8, field
