"""DoRA and PiSSA on a 4-bit base: the residual is what gets quantized (as the weights stream in),
both train, and both merge to a plain model that passes the merge check (KL, top-1)."""

import pytest
import torch

import lorakit
from lorakit.lora.init import ResidualInit
from lorakit.train.loss import count_supervised
from lorakit.train.step import TrainStep
from tiny_models import TINY, tiny_model

INIT_STD = 0.1  # as tests/model/test_qlora_train.py: a frozen head at 0.02 caps how far the loss falls


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_model("llama", initializer_range=INIT_STD).save_pretrained(path)
    return path


def _load(folder, config, prepared=True):
    prepare = ResidualInit(config) if prepared and config.residual_init else None
    model, _ = lorakit.load_model(str(folder), quantization="nf4", compute_dtype="fp32", load_tokenizer=False,
                                  prepare=prepare)
    torch.manual_seed(0)
    return lorakit.add_lora(model, config)


def _train(model, steps=40, lr=1e-2):
    ids = torch.randint(0, TINY["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "labels": ids.clone()}
    n = count_supervised(batch["labels"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = TrainStep(model)(batch)[0] / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def test_pissa_quantizes_the_residual_with_less_error(folder):
    """||W - (deq(Q(W_res)) + s B0 A0)|| < ||W - deq(Q(W))|| for every adapted layer (PiSSA paper,
    QLoRA + PiSSA): the principal part stays exact in A0, B0 and only the residual is rounded."""
    original = dict(tiny_model("llama", initializer_range=INIT_STD).named_parameters())
    config = lorakit.LoraConfig(r=8, alpha=16, init="pissa")
    pissa = _load(folder, config)
    plain = _load(folder, lorakit.LoraConfig(r=8, alpha=16))
    plain_layers = dict(plain.named_modules())
    better = 0
    for name, layer in pissa.named_modules():
        if isinstance(layer, lorakit.LoRALinear):
            w = original[f"{name}.weight"]
            rebuilt = layer.base_layer.dequantize(torch.float32) + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
            err_pissa = (rebuilt - w).norm() / w.norm()
            err_plain = (plain_layers[name].base_layer.dequantize(torch.float32) - w).norm() / w.norm()
            better += bool(err_pissa < err_plain)
    assert better == 14  # all 14 adapted layers


def test_residual_init_on_a_4bit_base_without_the_16bit_weights_is_an_error(folder):
    with pytest.raises(ValueError, match="4-bit base needs the 16-bit weights.*ResidualInit"):
        _load(folder, lorakit.LoraConfig(r=4, init="olora"), prepared=False)


@pytest.mark.parametrize("variant", [dict(use_dora=True), dict(init="pissa"), dict(init="pissa_niter_4", use_dora=True)])
def test_trains_and_merges_on_a_4bit_base(folder, variant, input_ids):
    model = _load(folder, lorakit.LoraConfig(r=8, alpha=16, **variant))
    assert all(isinstance(m.base_layer, lorakit.Linear4bit) for m in model.modules() if isinstance(m, lorakit.LoRALinear))
    losses = _train(model)
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        want = model(input_ids).logits
    merged = lorakit.merge(model, verify=input_ids)  # raises MergeVerificationError past KL 1e-3 / top-1 99%
    report = merged.lorakit_merge_report
    assert report.kl_divergence < 1e-6 and report.top1_agreement == 1.0
    with torch.no_grad():
        assert (merged(input_ids).logits - want).abs().max() <= 1e-4


def test_pissa_adapter_reloads_on_a_4bit_base_exactly(folder, input_ids, tmp_path):
    """What merge / generate do: load the base with the adapter's ResidualInit, then the adapter."""
    config = lorakit.LoraConfig(r=4, alpha=8, init="pissa", target_modules=("q_proj", "down_proj"))
    model = _load(folder, config)
    _train(model, steps=5)
    with torch.no_grad():
        want = model(input_ids).logits
    lorakit.save_adapter(model, tmp_path / "a")
    saved = lorakit.lora.io.read_adapter_config(tmp_path / "a")
    base, _ = lorakit.load_model(str(folder), quantization="nf4", compute_dtype="fp32", load_tokenizer=False,
                                 prepare=ResidualInit(saved))
    again = lorakit.load_adapter(base, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(again(input_ids).logits, want)


def test_quant_report_pissa_rank_measures_the_residual_error(capsys):
    """`lorakit quant-report --pissa-rank`: on the shipped demo model (a trained one, whose weights
    have a dominant principal part) keeping rank 16 exact cuts the NF4 weight error by about a third."""
    import argparse
    import json
    from pathlib import Path

    from lorakit.quant.report import quantize_dequantize
    from lorakit.recipes import quant_report
    from lorakit.recipes.demo import ASSETS

    args = quant_report.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", str(ASSETS / "model"), "--methods", "nf4", "--pissa-rank", "16", "--max-tokens", "64", "--json"])
    assert quant_report.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    plain, pissa = report["methods"]["nf4"], report["residual"]["methods"]["nf4"]
    assert set(pissa["layers"]) == set(plain["layers"]) and report["residual"]["rank"] == 16
    assert pissa["total"]["rel_error"] < 0.8 * plain["total"]["rel_error"]  # measured 0.0920 -> 0.0622
    # one layer by hand: ||W - (Q(W_res) + B0 A0)|| / ||W||
    model, _ = lorakit.load_model(str(ASSETS / "model"), compute_dtype="fp32", load_tokenizer=False)
    w = model.model.layers[0].self_attn.q_proj.weight.detach()
    a, b = lorakit.lora.init.residual_factors(w, 16, 1.0, "pissa")
    q = quantize_dequantize(lorakit.lora.init.residual_of(w, a, b, 1.0), "nf4")[0]
    want = float((q + b @ a - w).norm() / w.norm())
    assert pissa["layers"]["model.layers.0.self_attn.q_proj"]["rel_error"] == pytest.approx(want, rel=1e-4)


def test_merge_recipe_merges_a_pissa_adapter_onto_the_4bit_residual(folder, input_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.recipes.merge import merge_to_folder

    model = _load(folder, lorakit.LoraConfig(r=4, alpha=8, init="pissa", use_dora=True))
    _train(model, steps=5)
    with torch.no_grad():
        want = model(input_ids).logits
    lorakit.save_adapter(model, tmp_path / "a")
    merge_to_folder(str(folder), str(tmp_path / "a"), str(tmp_path / "m"), quantization="nf4", precision="fp32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert (merged(input_ids).logits - want).abs().max() <= 1e-4
