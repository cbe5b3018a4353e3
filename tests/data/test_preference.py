"""Preference pairs: the three row layouts, masking, EOS, truncation (prompt tail, answer heads),
and the named errors for malformed pairs."""

import json

import pytest

from lorakit.config import ConfigError, DataConfig, RunConfig, TrainConfig, LoraConfig
from lorakit.data import DataError, build_examples, detect_format, load_records
from lorakit.data.batches import Batches
from lorakit.data.tokenize import IGNORE_INDEX

from tiny_tokenizers import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("plain")


@pytest.fixture(scope="module")
def chat_tok():
    return make_tokenizer("chatml")


def cfg(**kw):
    return DataConfig(**{"template": "alpaca_short", "max_seq_len": 64, **kw})


def split(ex, side=""):
    ids, labels = ex[side + "input_ids"], ex[side + "labels"]
    k = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
    return ids[:k], ids[k:], labels[k:]


def test_string_pairs_share_the_prompt_and_supervise_each_answer_with_eos(tok):
    rows = [{"prompt": "the cat sat on", "chosen": " the mat.", "rejected": " a dog."}]
    assert detect_format(rows) == "preference"
    (ex,), stats = build_examples(rows, tok, cfg())
    p_c, a_c, l_c = split(ex)
    p_r, a_r, l_r = split(ex, "rejected_")
    assert p_c == p_r == tok("the cat sat on", add_special_tokens=False)["input_ids"]
    assert a_c == tok(" the mat.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] == l_c
    assert a_r == tok(" a dog.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] == l_r
    assert stats.format == "preference" and stats.n_examples == 1 and stats.n_truncated == 0


def test_hub_layout_chat_lists_share_their_turns(chat_tok):
    shared = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "name a pet"}]
    rows = [{"chosen": shared + [{"role": "assistant", "content": "a cat"}],
             "rejected": shared + [{"role": "assistant", "content": "no"}]}]
    (ex,), _ = build_examples(rows, chat_tok, cfg(template="auto"))
    prompt, answer, labels = split(ex)
    assert split(ex, "rejected_")[0] == prompt
    text = chat_tok.decode(prompt)
    assert text.endswith("<|im_start|>assistant\n") and "hello" in text  # the earlier answer is prompt, not supervised
    assert chat_tok.decode(labels) == "a cat<|im_end|>"
    # TRL's conversational layout gives the same pair
    (ex2,), _ = build_examples([{"prompt": shared, "chosen": rows[0]["chosen"][-1:], "rejected": rows[0]["rejected"][-1:]}],
                               chat_tok, cfg(template="auto"))
    assert ex2 == ex


def test_truncation_keeps_the_prompt_tail_and_the_answer_heads_and_is_counted(tok):
    prompt = " ".join(f"w{i}" for i in range(60))
    rows = [{"prompt": prompt, "chosen": " " + " ".join(["cat"] * 30), "rejected": " dog"}]
    (ex,), stats = build_examples(rows, tok, cfg(max_seq_len=32))
    assert stats.n_truncated == 1
    assert len(ex["input_ids"]) <= 32 and len(ex["rejected_input_ids"]) <= 32
    p, a, _ = split(ex)
    full_prompt = tok(prompt, add_special_tokens=False)["input_ids"]
    assert p == full_prompt[len(full_prompt) - len(p):]                     # the prompt's tail
    full_answer = tok(" " + " ".join(["cat"] * 30), add_special_tokens=False)["input_ids"]
    assert a == full_answer[:len(a)] and len(a) == 16                       # the head, M // 2 tokens
    assert split(ex, "rejected_")[1][-1] == tok.eos_token_id                # the short answer stays whole


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "a"}, r"row 1 \(format 'preference'\): missing field 'rejected'"),
    ({"prompt": "p", "chosen": " same", "rejected": " same"}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "field 'chosen' is empty"),
    ({"prompt": "p", "chosen": "a", "rejected": ["b"]}, "must both be strings or both lists"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "field 'prompt' must be a string"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other q"}, {"role": "assistant", "content": "a"}]},
     "field 'chosen': after the turns the two sides share"),
])
def test_malformed_pairs_name_the_file_row_and_field(tok, tmp_path, row, message):
    good = {"prompt": "p", "chosen": " yes", "rejected": " no"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message.replace("row 1", "row 2")) as e:
        build_examples(load_records(str(path)), tok, cfg(path=str(path), format="preference"))
    assert str(path) in str(e.value) and "row 2" in str(e.value)


def test_batches_put_chosen_first_and_a_stand_in_pair_counts_zero(tok):
    rows = [{"prompt": f"p{i}", "chosen": f" yes{i}", "rejected": " no" * (i + 1)} for i in range(3)]
    pairs, _ = build_examples(rows, tok, cfg())
    b = Batches(pairs, 2, 0, tok.pad_token_id, shuffle=False)[0]
    assert b["input_ids"].shape[0] == 4 and b["pairs"].tolist() == [True, True]
    assert b["input_ids"][0, :len(pairs[0]["input_ids"])].tolist() == pairs[0]["input_ids"]
    assert b["input_ids"][2, :len(pairs[0]["rejected_input_ids"])].tolist() == pairs[0]["rejected_input_ids"]
    # rank 1 of 2, one pair per rank: the second global micro-batch has one pair (rank 0's), rank 1 none
    stand_in = Batches(pairs, 1, 0, tok.pad_token_id, shuffle=False, rank=1, world_size=2)[1]
    assert stand_in["pairs"].tolist() == [False] and (stand_in["labels"] == IGNORE_INDEX).all()


def test_objective_and_data_must_agree():
    with pytest.raises(ConfigError, match="data.pack=true does not apply to train.objective=dpo"):
        RunConfig(data=DataConfig(pack=True), train=TrainConfig(objective="dpo"))
    with pytest.raises(ConfigError, match="lora.init='pissa'"):
        RunConfig(lora=LoraConfig(init="pissa"), train=TrainConfig(objective="dpo"))
    with pytest.raises(ConfigError, match="needs data.format=preference"):
        RunConfig(data=DataConfig(format="dolly"), train=TrainConfig(objective="orpo"))
    with pytest.raises(ConfigError, match=r"train.dpo_label_smoothing=0.5 is not allowed"):
        TrainConfig(objective="dpo", dpo_label_smoothing=0.5)
    with pytest.raises(DataError, match="train.objective dpo or orpo"):
        from lorakit.data.formats import render

        render({"chosen": "a", "rejected": "b"}, "preference")
