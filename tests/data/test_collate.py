"""Padding, packing, and the proof that packed rows give the same per-token loss as padded batches."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.config import DataConfig
from lorakit.data import (IGNORE_INDEX, block_causal_mask, build_examples, collate, collate_packed, pack_examples,
                          sequence_ids)

PACK_LEN = 128
WORDS = "the quick brown fox jumps over lazy dog hello world capital of France is Paris cats and dogs".split()


def make_records(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        k_prompt, k_resp = torch.randint(1, 12, (2,), generator=g).tolist()
        pick = lambda k: " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (k,), generator=g).tolist())
        records.append({"prompt": f"Q{i}: {pick(k_prompt)}?\n", "completion": pick(k_resp)})
    return records


@pytest.fixture(scope="module")
def examples(tokenizers_by_kind):
    tok = tokenizers_by_kind("plain")
    exs, stats = build_examples(make_records(12), tok, DataConfig(max_seq_len=64))
    return exs, stats, tok


def test_collate_right_pads(examples):
    exs, _, tok = examples
    batch = collate(exs[:3], pad_id=tok.pad_token_id)
    longest = max(len(e["input_ids"]) for e in exs[:3])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    for key in batch:
        assert batch[key].shape == (3, longest) and batch[key].dtype == torch.long
    for b, e in enumerate(exs[:3]):
        n = len(e["input_ids"])
        assert batch["input_ids"][b, :n].tolist() == e["input_ids"] and batch["labels"][b, :n].tolist() == e["labels"]
        assert (batch["input_ids"][b, n:] == tok.pad_token_id).all() and (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (longest - n)


def test_collate_pad_to_multiple_of_8(examples):
    exs, _, tok = examples
    batch = collate(exs[:2], pad_id=tok.pad_token_id, pad_to_multiple_of=8)
    longest = max(len(e["input_ids"]) for e in exs[:2])
    assert batch["input_ids"].shape[1] == -(-longest // 8) * 8 >= longest
    with pytest.raises(ValueError, match="pad_to_multiple_of=0"):
        collate(exs[:2], pad_id=0, pad_to_multiple_of=0)


def test_pack_examples_keeps_every_token_in_order(examples):
    exs, _, _ = examples
    rows = pack_examples(exs, max_seq_len=PACK_LEN)
    assert 1 < len(rows) < len(exs) and max(len(r["seq_lens"]) for r in rows) >= 3
    assert [x for r in rows for x in r["input_ids"]] == [x for e in exs for x in e["input_ids"]]
    assert [n for r in rows for n in r["seq_lens"]] == [len(e["input_ids"]) for e in exs]
    for r in rows:
        assert len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) == sum(r["seq_lens"]) <= PACK_LEN
        start = 0
        for n in r["seq_lens"]:
            assert r["position_ids"][start:start + n] == list(range(n))
            assert r["labels"][start] == IGNORE_INDEX  # never predicted from the previous example
            start += n
    # greedy: the next example would not have fitted in the previous row
    for prev, nxt in zip(rows, rows[1:]):
        assert sum(prev["seq_lens"]) + nxt["seq_lens"][0] > PACK_LEN
    # same supervised tokens as unpacked (labels[0] is already IGNORE_INDEX in every example)
    assert [x for r in rows for x in r["labels"]] == [x for e in exs for x in e["labels"]]


def test_pack_rejects_too_long_example():
    with pytest.raises(ValueError, match="example 1 has 5 tokens > max_seq_len=4"):
        pack_examples([{"input_ids": [1, 2], "labels": [-100, 2]}, {"input_ids": [1] * 5, "labels": [1] * 5}], 4)


def test_collate_packed_and_sequence_ids_match_transformers(examples):
    from transformers.masking_utils import find_packed_sequence_indices

    exs, _, tok = examples
    rows = pack_examples(exs, max_seq_len=PACK_LEN)
    batch = collate_packed(rows, pad_id=tok.pad_token_id)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: see collate.py
    length = batch["input_ids"].shape[1]
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["position_ids"][b, n:].tolist() == list(range(length - n))
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
    seq = sequence_ids(batch["position_ids"])
    torch.testing.assert_close(seq, find_packed_sequence_indices(batch["position_ids"]))
    for b, r in enumerate(rows):  # one block per example, plus one for the padding (if any)
        expected = [k for k, n in enumerate(r["seq_lens"]) for _ in range(n)]
        expected += [len(r["seq_lens"])] * (length - len(expected))
        assert seq[b].tolist() == expected


def test_block_causal_mask():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = block_causal_mask(pos, torch.float32)
    allowed = (mask == 0)[0, 0].int().tolist()
    assert mask.shape == (1, 1, 6, 6)
    assert allowed == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                       [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    assert mask.min().item() == torch.finfo(torch.float32).min


# ---------------------------------------------------------------- packed loss == unpacked loss


def tiny_model(arch, attn):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=400, max_position_embeddings=256)
    model = LlamaForCausalLM(LlamaConfig(**shape)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**shape))
    model.set_attn_implementation(attn)
    return model.float().eval()


def per_token_ce(model, batch, **inputs):
    """CE of every supervised (shifted) token, in row-major order: labels aligned, loss shifts by one."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], **inputs).logits.float()  # [B, L, V]
    logits, labels = logits[:, :-1], batch["labels"][:, 1:]  # predict token t+1 from position t
    keep = labels != IGNORE_INDEX  # [B, L-1]
    return F.cross_entropy(logits[keep], labels[keep], reduction="none")  # [n_supervised]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(examples, arch, attn):
    exs, stats, tok = examples
    model = tiny_model(arch, attn)
    padded = collate(exs, pad_id=tok.pad_token_id)
    reference = per_token_ce(model, padded, attention_mask=padded["attention_mask"])
    assert reference.numel() == stats.n_supervised_tokens == int((padded["labels"] != IGNORE_INDEX).sum())

    packed = collate_packed(pack_examples(exs, max_seq_len=PACK_LEN), pad_id=tok.pad_token_id)
    assert packed["input_ids"].shape[0] < len(exs)
    pos = packed["position_ids"]
    # 1) the shipped contract: position_ids, no mask, use_cache=False -> transformers detects the packing
    by_positions = per_token_ce(model, packed, position_ids=pos, use_cache=False)
    # 2) the explicit 4D block-diagonal causal mask (works with the config's use_cache too)
    by_mask = per_token_ce(model, packed, position_ids=pos, attention_mask=block_causal_mask(pos, torch.float32))
    for got in (by_positions, by_mask):
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
        assert abs(got.sum().item() - reference.sum().item()) < 1e-5 * reference.numel()

    # negative controls, the two ways to break (1): each lets examples attend to earlier ones
    leaky_2d = per_token_ce(model, packed, position_ids=pos, attention_mask=torch.ones_like(pos), use_cache=False)
    leaky_cache = per_token_ce(model, packed, position_ids=pos)  # use_cache from config (True)
    assert model.config.use_cache
    for leaky in (leaky_2d, leaky_cache):
        assert (leaky - reference).abs().max().item() > 1e-3
