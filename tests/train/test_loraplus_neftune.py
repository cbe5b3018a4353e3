"""LoRA+ (B at ratio x lr, every optimizer kind, resume) and NEFTune (training-mode noise only,
the same noise as transformers' hook)."""

import json

import pytest
import torch

import lorakit
from lorakit.config import DataConfig, LoraConfig, RunConfig, TrainConfig
from lorakit.train.loop import train
from lorakit.train.neftune import install_neftune, neftune_noise
from lorakit.train.optim import build_optimizer, param_groups
from lorakit.train.schedule import build_scheduler

from killing import dies_after_checkpoint
from tiny_models import make_examples, tiny_model

PAD = 0
OPTIMIZERS = ["adamw_torch", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"]


def adapted(seed=0, **lora):
    model = tiny_model("llama")
    torch.manual_seed(seed)
    return lorakit.add_lora(model, LoraConfig(**{"r": 4, "alpha": 8, **lora}))


def run_cfg(path, **kw):
    base = dict(output_dir=str(path), micro_batch_size=2, lr=5e-3, max_steps=6, eval_every=2, save_every=3,
                keep_last=10, seed=3, warmup_steps=1, precision="fp32")
    return RunConfig(data=DataConfig(max_seq_len=64), train=TrainConfig(**{**base, **kw}))


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r], [r["lr"] for r in rows if "lr" in r]


# ---------------------------------------------------------------- LoRA+


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_loraplus_gives_b_ratio_times_lr(optimizer):
    model = adapted(target_modules=("q_proj", "embed_tokens"), use_dora=True, bias="lora_only")
    opt = build_optimizer(param_groups(model, 1e-3, 16.0), optimizer, lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs == {n: 16e-3 if (".lora_B." in n or "lora_embedding_B" in n or p.ndim == 1) else 1e-3
                   for n, p in model.named_parameters() if p.requires_grad}
    assert {lrs["model.layers.0.self_attn.q_proj.lora_B.weight"], lrs["model.embed_tokens.lora_embedding_B"],
            lrs["model.layers.0.self_attn.q_proj.lora_magnitude_vector"]} == {16e-3}
    assert {lrs["model.layers.0.self_attn.q_proj.lora_A.weight"], lrs["model.embed_tokens.lora_embedding_A"]} == {1e-3}
    # the schedule scales both groups alike, so the ratio holds at every step
    sched = build_scheduler(opt, 10, 2, "cosine")
    for _ in range(4):
        opt.step()
        sched.step()
        assert opt.param_groups[1]["lr"] == pytest.approx(16 * opt.param_groups[0]["lr"])


def test_loraplus_off_is_one_group():
    model = adapted()
    assert len(build_optimizer(param_groups(model, 1e-3), "adamw_torch", lr=1e-3).param_groups) == 1


@pytest.mark.parametrize("optimizer", ["adamw_torch", "paged_adamw_8bit"])
def test_loraplus_survives_resume(tmp_path, monkeypatch, optimizer):
    examples, val = make_examples(10, seed=4), make_examples(3, seed=5)
    kw = dict(max_steps=6, loraplus_lr_ratio=8.0, optimizer=optimizer)
    train(adapted(r=64), examples, val, run_cfg(tmp_path / "full", **kw), pad_id=PAD, progress=False)
    want, want_lr = _losses(tmp_path / "full")
    with dies_after_checkpoint(monkeypatch, 3):
        train(adapted(r=64), examples, val, run_cfg(tmp_path / "part", **kw), pad_id=PAD, progress=False)
    saved = torch.load(tmp_path / "part" / "checkpoint-000003" / "trainer_state.pt", weights_only=True)
    groups = saved["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["initial_lr"] == pytest.approx(8 * groups[0]["initial_lr"])
    train(adapted(seed=99, r=64), examples, val, run_cfg(tmp_path / "part", **kw), pad_id=PAD, resume=True,
          progress=False)
    got, got_lr = _losses(tmp_path / "part")
    assert [s for s, _ in got] == [s for s, _ in want] and got_lr == pytest.approx(want_lr)
    for (_, a), (_, b) in zip(got, want):
        assert abs(a - b) <= 1e-6


def test_loraplus_ratio_validated():
    with pytest.raises(ValueError, match="train.loraplus_lr_ratio"):
        TrainConfig(loraplus_lr_ratio=-1.0)


# ---------------------------------------------------------------- NEFTune


def test_neftune_noise_only_in_training_mode(input_ids):
    model = adapted(target_modules=("q_proj", "embed_tokens"))
    emb = model.get_input_embeddings()
    with torch.no_grad():
        clean = emb(input_ids)
        handle = install_neftune(model, 5.0)
        emb.train()
        noisy = emb(input_ids)
        emb.eval()
        assert torch.equal(emb(input_ids), clean)      # eval: never noise
        model.eval()
        logits = model(input_ids).logits
        handle.remove()
        assert torch.equal(model(input_ids).logits, logits)
    bound = 5.0 / (input_ids.shape[1] * clean.shape[-1]) ** 0.5  # alpha / sqrt(L d)
    diff = (noisy - clean).abs()
    assert 0 < diff.max() <= bound * (1 + 1e-6) and diff.mean() > bound / 4


def test_neftune_equals_transformers_hook_for_the_same_seed(input_ids):
    try:
        from transformers.integrations.neftune import neftune_post_forward_hook
    except ImportError:  # transformers < 5.2 keeps it in trainer_utils
        from transformers.trainer_utils import neftune_post_forward_hook

    emb = torch.nn.Embedding(160, 64)
    emb.train()
    out = emb(input_ids).detach()
    emb.neftune_noise_alpha = 5.0
    torch.manual_seed(11)
    theirs = neftune_post_forward_hook(emb, (input_ids,), out)
    torch.manual_seed(11)
    assert torch.equal(neftune_noise(out, 5.0), theirs)


def test_neftune_in_the_loop_trains_noisily_and_leaves_no_hook(tmp_path):
    examples, val = make_examples(8, seed=4), make_examples(3, seed=5)
    plain = train(adapted(), examples, val, run_cfg(tmp_path / "a", max_steps=3), pad_id=PAD, progress=False)
    model = adapted()
    noisy = train(model, examples, val, run_cfg(tmp_path / "b", max_steps=3, neftune_alpha=50.0), pad_id=PAD,
                  progress=False)
    assert noisy.final_train_loss != plain.final_train_loss
    assert not model.get_input_embeddings()._forward_hooks  # removed after training
    again = install_neftune(model, 5.0)
    assert len(model.get_input_embeddings()._forward_hooks) == 1
    install_neftune(model, 5.0)  # installing twice replaces, never stacks
    assert len(model.get_input_embeddings()._forward_hooks) == 1
    again.remove()
