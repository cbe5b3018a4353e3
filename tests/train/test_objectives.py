"""DPO and ORPO against TRL 1.16 (its DPOTrainer on a PEFT model; its ORPO odds-ratio and log-prob
functions), the 4-bit base against the formulas written out here, the reference pass with the
adapters off, and the per-row log-probabilities of the fused / chunked head against a dense one."""

import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lorakit
from lorakit.config import DataConfig
from lorakit.data.collate import collate_pairs
from lorakit.data.preference import build_pairs
from lorakit.lora.switch import adapters_disabled
from lorakit.train import objectives
from lorakit.train.objectives import DPO, ORPO, reference_logps, sequence_logps
from lorakit.train.step import TrainStep

from tiny_models import tiny_model
from tiny_tokenizers import make_tokenizer, write_tiny_model_folder

ROWS = [{"prompt": "the cat sat on", "chosen": " the mat.", "rejected": " a dog that barked all night."},
        {"prompt": "one two", "chosen": " three four five", "rejected": " six"},
        {"prompt": "hello world, hello", "chosen": " again", "rejected": " there, and hello again"}]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("plain")


@pytest.fixture(scope="module")
def batch(tok):
    pairs, _ = build_pairs(ROWS, tok, DataConfig(template="alpaca_short", max_seq_len=64))
    return collate_pairs(pairs, tok.pad_token_id)


def randomize_lora(model, seed=3, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def adapted(vocab, seed=0):
    model = lorakit.add_lora(tiny_model("llama", seed=seed, vocab_size=vocab), lorakit.LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    return model.train()


def lora_grads(model, prefix=""):
    """{module path.lora_A|B: grad} for our model or PEFT's (".default" dropped)."""
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n and p.grad is not None:
            out[n.replace(prefix, "").replace(".default", "")] = p.grad.clone()
    return out


def trl_trainer(model_vocab, tok, adapter_dir, tmp_path, **dpo_args):
    """TRL's DPOTrainer with a *new* PEFT adapter (so its reference is the base with adapters off,
    as ours), then our random LoRA weights copied in."""
    peft = pytest.importorskip("peft")
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, max_length=None,
                         per_device_train_batch_size=len(ROWS), **dpo_args)
    trainer = trl.DPOTrainer(model=tiny_model("llama", vocab_size=model_vocab), args=args,
                             train_dataset=Dataset.from_list(ROWS), processing_class=tok,
                             peft_config=peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    result = peft.set_peft_model_state_dict(trainer.model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_metrics_and_gradients_equal_trl(tok, batch, tmp_path, loss_type):
    model = adapted(len(tok))
    lorakit.save_adapter(model, tmp_path / "a")
    step = TrainStep(model, objective=DPO(beta=0.1, loss_type=loss_type))
    loss_sum, units = step(batch)
    ours = loss_sum / units
    ours.backward()
    stats = {k: float(v / units) for k, v in step.take_stats().items()}

    trainer = trl_trainer(len(tok), tok, tmp_path / "a", tmp_path, beta=0.1, loss_type=[loss_type])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long()}
    theirs = trainer._compute_loss(trainer.model, inputs, False)
    theirs.backward()
    assert abs(float(ours) - float(theirs)) <= 1e-5
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert abs(stats[name] - trainer._metrics["train"][name][-1]) <= 1e-5 * max(1.0, abs(stats[name])), name
    g_ours, g_theirs = lora_grads(model), lora_grads(trainer.model, "base_model.model.")
    assert g_ours.keys() == g_theirs.keys() and len(g_ours) == 2 * 7 * 2
    for k in g_ours:
        torch.testing.assert_close(g_ours[k], g_theirs[k], rtol=1e-4, atol=1e-6)


def test_orpo_equals_trl_odds_ratio_and_log_probs(tok, batch):
    """ORPO's loss from TRL's own functions (ORPOTrainer.odds_ratio_loss, get_batch_logps: dense
    logits) plus the chosen answers' mean CE, against ours: loss and gradients."""
    orpo_mod = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    lam = 0.25
    model = adapted(len(tok))
    step = TrainStep(model, objective=ORPO(lam))
    loss_sum, units = step(batch)
    (loss_sum / units).backward()
    stats = {k: float(v / units) for k, v in step.take_stats().items()}
    g_ours = lora_grads(model)
    model.zero_grad()

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [2B, T, V]
    labels = batch["labels"]
    b = labels.shape[0] // 2
    mean_logps = orpo_mod.ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)     # [2B]
    fake = types.SimpleNamespace(beta=lam, accelerator=types.SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards, _, _ = orpo_mod.ORPOTrainer.odds_ratio_loss(fake, mean_logps[:b], mean_logps[b:])
    nll = F.cross_entropy(logits[:b, :-1].flatten(0, 1), labels[:b, 1:].flatten(), ignore_index=-100)
    theirs = nll - losses.mean()
    theirs.backward()
    assert abs(float(loss_sum / units) - float(theirs)) <= 1e-5
    assert abs(stats["rewards/chosen"] - float(chosen_rewards.mean())) <= 1e-6
    assert abs(stats["nll_loss"] - float(nll)) <= 1e-5
    g_theirs = lora_grads(model)
    for k in g_ours:
        torch.testing.assert_close(g_ours[k], g_theirs[k], rtol=1e-4, atol=1e-6)


def dense_logps(model, batch):
    """Per-row sum of log softmax(logits)[label] over the supervised positions: the definition."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    y = batch["labels"][:, 1:]
    lp = torch.log_softmax(logits[:, :-1], -1).gather(2, y.clamp(min=0)[..., None])[..., 0]
    return (lp * (y != -100)).sum(1)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_4bit_base_equals_the_formulas(tmp_path_factory, tok, method):
    """QLoRA base (NF4): our loss and gradients against DPO / ORPO written out here on dense logits,
    the reference from a second, adapter-free load of the same 4-bit base."""
    folder = write_tiny_model_folder(tmp_path_factory.mktemp("m4"))
    model, tok = lorakit.load_model(folder, quantization="nf4", compute_dtype="fp32")
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8))
    randomize_lora(model, scale=0.2)
    model.train()
    base, _ = lorakit.load_model(folder, quantization="nf4", compute_dtype="fp32", load_tokenizer=False)
    pairs, _ = build_pairs(ROWS, tok, DataConfig(template="alpaca_short", max_seq_len=64))
    batch = collate_pairs(pairs, tok.pad_token_id)
    beta = 0.1
    objective = DPO(beta) if method == "dpo" else ORPO(beta)
    loss_sum, units = TrainStep(model, objective=objective)(batch)
    (loss_sum / units).backward()
    g_ours = lora_grads(model)
    model.zero_grad()

    pi = dense_logps(model, batch)
    c, r = pi.chunk(2)
    if method == "dpo":
        with torch.no_grad():
            ref_c, ref_r = dense_logps(base.eval(), batch).chunk(2)
        want = -F.logsigmoid(beta * ((c - ref_c) - (r - ref_r))).mean()
    else:
        n_c, n_r = (batch["labels"][:, 1:] != -100).sum(1).chunk(2)
        a_c, a_r = c / n_c, r / n_r
        log_odds = (a_c - a_r) - (torch.log(1 - torch.exp(a_c)) - torch.log(1 - torch.exp(a_r)))
        want = -c.sum() / n_c.sum() - beta * F.logsigmoid(log_odds).mean()
    want.backward()
    assert abs(float(loss_sum / units) - float(want)) <= 1e-5
    for k, g in g_ours.items():
        torch.testing.assert_close(g, lora_grads(model)[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_per_row_log_probs_of_fused_and_chunked_heads_equal_dense(tok, batch, fused):
    model = adapted(len(tok))
    step = TrainStep(model, loss_chunk_size=5, fused_loss=fused)  # chunks of 5 rows: several per batch
    logp, n = sequence_logps(step, batch)
    want = dense_logps(model, batch)
    torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-5)
    assert n.tolist() == (batch["labels"][:, 1:] != -100).sum(1).tolist()
    (g,) = torch.autograd.grad(logp @ torch.arange(1.0, len(logp) + 1), [model.model.layers[0].self_attn.q_proj.lora_B.weight])
    (g_want,) = torch.autograd.grad(want @ torch.arange(1.0, len(want) + 1), [model.model.layers[0].self_attn.q_proj.lora_B.weight])
    torch.testing.assert_close(g, g_want, rtol=1e-4, atol=1e-6)


def test_reference_is_the_base_model_exactly_and_the_adapters_come_back(tok, batch):
    base = tiny_model("llama", vocab_size=len(tok)).requires_grad_(False)  # frozen as under LoRA (the fused head)
    with torch.no_grad():
        want, _ = sequence_logps(TrainStep(base), batch)
    model = adapted(len(tok))  # same base weights (seed 0), random LoRA, train mode, LoRA dropout 0
    step = TrainStep(model)
    policy_before, _ = sequence_logps(step, batch)
    ref = reference_logps(step, batch)
    assert torch.equal(ref, want)                                     # bit for bit the base model
    assert not torch.allclose(policy_before, ref)                     # the adapter does change the answer
    assert model.training and all(m.adapter_active for m in model.modules() if hasattr(m, "adapter_active"))
    assert torch.equal(sequence_logps(step, batch)[0], policy_before)


def test_an_exception_in_the_reference_pass_leaves_the_adapters_on(tok, batch, monkeypatch):
    model = adapted(len(tok))
    step = TrainStep(model, objective=DPO())
    before = float(step(batch)[0])
    step.take_stats()

    def failing(*a, **k):
        assert not any(m.adapter_active for m in model.modules() if hasattr(m, "adapter_active"))  # really off
        raise RuntimeError("out of memory in the reference pass")

    monkeypatch.setattr(objectives, "sequence_logps", failing)
    with pytest.raises(RuntimeError, match="reference pass"):
        step(batch)
    monkeypatch.undo()
    switches = [m.adapter_active for m in model.modules() if hasattr(m, "adapter_active")]
    assert len(switches) == 14 and all(switches) and model.training
    assert float(step(batch)[0]) == before


def test_adapters_disabled_restores_each_layers_own_state(tok):
    model = adapted(len(tok))
    layers = [m for m in model.modules() if hasattr(m, "adapter_active")]
    layers[0].adapter_active = False  # already off before: stays off after
    with adapters_disabled(model):
        assert not any(m.adapter_active for m in layers)
    assert [m.adapter_active for m in layers] == [False] + [True] * (len(layers) - 1)


def test_stand_in_pairs_count_zero_and_keep_the_loss_finite(tok, batch):
    """A distributed stand-in pair (nothing supervised) adds nothing, also for ORPO's log1mexp."""
    blank = {k: v.clone() for k, v in batch.items()}
    b = blank["pairs"].shape[0]
    blank["labels"][[0, b]] = -100
    blank["pairs"][0] = False
    for objective in (DPO(), ORPO()):
        model = adapted(len(tok))
        loss_sum, units = TrainStep(model, objective=objective)(blank)
        assert units == b - 1 and torch.isfinite(loss_sum)
        loss_sum.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
