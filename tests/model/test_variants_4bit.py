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
