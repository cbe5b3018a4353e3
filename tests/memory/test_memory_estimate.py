"""The estimator's exact components against the tensors lorakit really creates (no training)."""

import argparse
import json

import pytest
import torch
import transformers

from lorakit import LoraConfig, Linear4bit, add_lora
from lorakit.model.modules import replace_module
from lorakit.memory.activations import activation_bytes
from lorakit.memory.measure import save_random_checkpoint
from lorakit.memory.estimate import Settings, adapted_layers, estimate, linear4bit_bytes, optimizer_state_bytes
from lorakit.memory.planner import DoesNotFit, fit, parse_size, plan_micro_batch, predict_for_run, settings_for_run
from lorakit.memory.shapes import builtin_names, from_builtin, from_hf_config, resolve_shape
from lorakit.model.load import load_model, quantize_targets
from lorakit.train.step import TrainStep
from lorakit.train.optim import build_optimizer, state_bytes

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SMALL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)


def adapted_model(arch="llama", method="lora", dtype="bf16", attn="sdpa", targets="all-linear", r=8, lora=None, **extra):
    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "gemma2": transformers.Gemma2Config}[arch]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "gemma2": transformers.Gemma2ForCausalLM}[arch]
    torch.manual_seed(0)
    config = cfg_cls(**{**SMALL, **extra}, attn_implementation=attn)
    model = model_cls(config).to(DTYPES[dtype])
    if method == "qlora":  # exactly what load_model does per target layer
        for name in quantize_targets(model, ("lm_head",)):
            replace_module(model, name, Linear4bit.from_linear(model.get_submodule(name), compute_dtype=DTYPES[dtype]))
    add_lora(model, LoraConfig(r=r, target_modules=targets, **(lora or {})))
    return model.train()


def settings(model, **kw):
    return Settings(device="cpu", rank=8, **kw)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", [(96, 64), (256, 130)])
def test_linear4bit_bytes_match_the_stored_buffers(shape, blocksize, double_quant):
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(shape[1], shape[0], bias=False).bfloat16(), blocksize=blocksize,
                                   double_quant=double_quant)
    s = Settings(blocksize=blocksize, double_quant=double_quant)
    assert linear4bit_bytes(shape[0], shape[1], s) == layer.nbytes_weight()


@pytest.mark.parametrize("method,dtype,optimizer,lora", [
    ("lora", "bf16", "adamw_torch", {}), ("qlora", "bf16", "adamw_8bit", {}), ("qlora", "fp32", "paged_adamw_32bit", {}),
    ("lora", "bf16", "adamw_torch", dict(use_dora=True, init="pissa")),
    ("qlora", "bf16", "adamw_8bit", dict(use_dora=True, target_modules=("embed_tokens", "q_proj"))),
    ("qlora", "bf16", "adamw_torch", dict(init="olora", target_modules=("embed_tokens", "o_proj")))])
def test_weight_and_optimizer_components_are_exact(method, dtype, optimizer, lora, tmp_path):
    from lorakit.lora.init import weight_preparer

    config = {"model_type": "qwen2", **SMALL}  # q/k/v biases too
    save_random_checkpoint(config, tmp_path, DTYPES[dtype])
    lora_cfg = LoraConfig(r=64, **lora)  # r=64: LoRA matrices >= 4096 elements get 8-bit optimizer state
    model, _ = load_model(str(tmp_path), quantization="nf4" if method == "qlora" else None, compute_dtype=dtype,
                          device="cpu", load_tokenizer=False, prepare=weight_preparer(lora_cfg))
    add_lora(model, lora_cfg)
    s = Settings(method=method, dtype=dtype, optimizer=optimizer, device="cpu", rank=64, targets=lora_cfg.target_modules,
                 use_dora=lora_cfg.use_dora, residual_init=lora_cfg.residual_init)
    est = estimate(model, s)
    frozen = sum(t.numel() * t.element_size() for t in model.parameters() if not t.requires_grad)
    frozen += sum(t.numel() * t.element_size() for t in model.buffers())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert est.components["frozen_weights"] == frozen
    assert est.components["trainable_weights"] == sum(p.numel() * p.element_size() for p in trainable)
    opt = build_optimizer(trainable, optimizer, lr=1e-3)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert est.components["optimizer_state"] == state_bytes(opt)


def test_paged_state_costs_no_gpu_memory():
    s = Settings(optimizer="paged_adamw_8bit", device="cuda")
    assert optimizer_state_bytes([10_000, 100], 4, s) == 0
    assert optimizer_state_bytes([10_000, 100], 4, Settings(optimizer="adamw_8bit")) == 2 * 10_000 + 8 * 40 + 800


CASES = [
    dict(method="lora", dtype="bf16", attn="sdpa"),
    dict(method="lora", dtype="fp32", attn="sdpa"),
    dict(method="qlora", dtype="bf16", attn="sdpa"),
    dict(method="lora", dtype="bf16", attn="eager"),
    dict(method="lora", dtype="fp32", attn="eager"),
    dict(method="qlora", dtype="bf16", attn="sdpa", targets=("q_proj", "v_proj")),
    dict(method="lora", dtype="bf16", attn="sdpa", arch="qwen2"),
    dict(method="lora", dtype="bf16", attn="sdpa", lean=True),
    dict(method="lora", dtype="fp32", attn="eager", lean=True),
    dict(method="qlora", dtype="bf16", attn="sdpa", lean=True),
    dict(method="lora", dtype="bf16", attn="sdpa", arch="qwen2", lean=True),
    dict(method="lora", dtype="bf16", attn="sdpa", lora=dict(use_dora=True)),
    dict(method="qlora", dtype="bf16", attn="sdpa", lora=dict(use_dora=True), lean=True),
    dict(method="lora", dtype="fp32", attn="eager", lora=dict(use_dora=True), arch="qwen2"),
    dict(method="lora", dtype="bf16", attn="sdpa", lora=dict(use_dora=True, branch_dtype="adapter")),
    dict(method="lora", dtype="bf16", attn="sdpa", targets=("q_proj", "embed_tokens")),
    dict(method="qlora", dtype="bf16", attn="sdpa", targets=("embed_tokens", "down_proj"), lora=dict(use_dora=True)),
    dict(method="lora", dtype="fp32", attn="sdpa", targets=("embed_tokens",)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_saved_activations_match_autograd(case, monkeypatch):
    """Every tensor autograd saves for backward (unique storages, weights excluded) is predicted,
    with the plain and the lean MLP (model/lean.py)."""
    from lorakit.model import lean as lean_mod

    case = dict(case)
    targets = case.pop("targets", "all-linear")
    attn = case.pop("attn")
    lean = case.pop("lean", False)
    lora = case.pop("lora", {})
    model = adapted_model(targets=targets, attn=attn, lora=lora, **case)
    batch_size, seq_len = 2, 48
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SMALL["vocab_size"], (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    saved = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    if lean:
        counts = lean_mod.install_lean(model)
        assert counts == {"mlp": model.config.num_hidden_layers, "norm": 2 * model.config.num_hidden_layers + 1}
        # the lean MLP's own hooks run inside this one: count what they keep as they are (not the
        # rebuilt down_proj input)
        init = lean_mod._RebuildProduct.__init__

        def counting_init(self, *args):
            init(self, *args)
            inner = self.pack_hook
            self.pack_hook = lambda t: pack(t) if isinstance(inner(t), torch.Tensor) else inner(t)

        monkeypatch.setattr(lean_mod._RebuildProduct, "__init__", counting_init)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        TrainStep(model)(batch)
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    measured = sum(v for k, v in saved.items() if k not in weights)
    shape = from_hf_config(model.config)
    s = Settings(method=case["method"], dtype=case["dtype"], seq_len=seq_len, batch_size=batch_size, rank=8,
                 targets=targets, device="cpu", lean_activations=lean, **lora)
    assert activation_bytes(shape, s, adapted_layers(shape, targets))["total"] == measured


def test_builtin_shapes_count_the_parameters_transformers_builds():
    for name, cfg_cls in [("qwen2.5-0.5b", transformers.Qwen2Config), ("llama-3.2-1b", transformers.LlamaConfig)]:
        shape = from_builtin(name)
        cfg = cfg_cls(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=2,
                      num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                      vocab_size=shape.vocab, tie_word_embeddings=shape.tied)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        two_layers = from_hf_config(cfg)
        assert two_layers.n_params() == sum(p.numel() for p in model.parameters())
    # the public headline sizes: Llama-2-7B 6.74B, Llama-3.1-8B 8.03B, Qwen2.5-0.5B 0.49B, Mistral-7B 7.24B
    for name, billions in [("llama-2-7b", 6.74), ("llama-3.1-8b", 8.03), ("qwen2.5-0.5b", 0.49), ("mistral-7b", 7.24),
                           ("llama-2-70b", 68.98), ("gemma-2-9b", 9.24), ("phi-3-mini", 3.82)]:
        assert round(from_builtin(name).n_params() / 1e9, 2) == billions, name
    assert len(builtin_names()) >= 19


def test_resolve_shape_from_folder_and_errors(tmp_path):
    cfg = transformers.LlamaConfig(**SMALL)
    cfg.save_pretrained(tmp_path)
    shape = resolve_shape(str(tmp_path))
    assert (shape.hidden, shape.layers, shape.kv_heads, shape.vocab) == (128, 2, 2, 300)
    assert resolve_shape("Llama-2-7B").name == "llama-2-7b"
    with pytest.raises(ValueError, match="built-in names: .*llama-2-7b"):
        resolve_shape("./no-such-model")


def test_parse_size():
    assert parse_size("15GiB") == 15 * 2**30
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("800MiB") == 800 * 2**20
    assert parse_size("1.5G") == int(1.5 * 2**30)
    with pytest.raises(ValueError, match="15GiB"):
        parse_size("fifteen")


def test_components_grow_the_way_they_should():
    base = Settings(method="qlora", seq_len=512)
    e = estimate("llama-2-7b", base)
    plain = estimate("llama-2-7b", base, grad_ckpt=True, ckpt_replay=False).components["activations"]
    replay = estimate("llama-2-7b", base, grad_ckpt=True).components["activations"]
    assert plain < e.components["activations"] / 4
    # replay keeps q/k/v/o/down outputs: 5 x 4096 bf16 values per token and layer (no GQA in Llama-2)
    assert replay - plain == 32 * 512 * 5 * 4096 * 2
    assert replay < e.components["activations"] / 2
    # lean activations (default): the MLP keeps neither act(gate) nor down's input (2 x 11008 bf16 per
    # token and layer), and each of the 64 norms with a gradient its bf16 input instead of fp32
    fat = estimate("llama-2-7b", base, lean_activations=False).components["activations"]
    assert fat - e.components["activations"] == 32 * 512 * 2 * 11008 * 2 + 64 * 512 * 4096 * (4 - 2)
    # 16-bit LoRA replays the same outputs; full fine-tuning has no frozen layer to replay
    assert estimate("llama-2-7b", base, method="lora", grad_ckpt=True).components["activations"] - \
        estimate("llama-2-7b", base, method="lora", grad_ckpt=True, ckpt_replay=False).components["activations"] \
        == 32 * 512 * 5 * 4096 * 2
    assert estimate("llama-2-7b", base, method="full", grad_ckpt=True).components["activations"] == \
        estimate("llama-2-7b", base, method="full", grad_ckpt=True, ckpt_replay=False).components["activations"]
    assert estimate("llama-2-7b", base, method="lora").components["frozen_weights"] > 3 * e.components["frozen_weights"]
    assert estimate("llama-2-7b", base, optimizer="adamw_8bit").components["optimizer_state"] < e.components["optimizer_state"] / 3
    assert estimate("llama-2-7b", base, optimizer="paged_adamw_32bit").components["optimizer_state"] == 0
    # linear in the batch: per-token tensors, plus the bf16 copies of the fp32 LoRA weights that the
    # branch saves once per adapted layer (r * (in + out) * 2 bytes, whatever the batch)
    a1, a2, a3 = (estimate("llama-2-7b", base, batch_size=b).components["activations"] for b in (1, 2, 3))
    assert a3 - a2 == pytest.approx(a2 - a1, rel=1e-3)
    copies = 2 * a1 - a2
    assert 0 < copies < 0.05 * a1
    assert estimate("llama-2-7b", base, branch_dtype="adapter", batch_size=1).components["activations"] > a1
    assert e.total_bytes == sum(e.components.values())


def test_plan_micro_batch_keeps_the_effective_batch():
    s = Settings(method="qlora", seq_len=1024, batch_size=1)
    budget = estimate("llama-2-7b", s, batch_size=4).total_bytes + 1
    micro, accum, predicted = plan_micro_batch("llama-2-7b", s, budget, effective_batch=16)
    assert (micro, accum) == (4, 4) and predicted <= budget
    assert estimate("llama-2-7b", s, batch_size=8).total_bytes > budget
    with pytest.raises(DoesNotFit, match="micro-batch 1"):
        plan_micro_batch("llama-2-70b", s, parse_size("15GiB"), effective_batch=16)


def test_fit_orders_options_and_each_fits():
    s = Settings(method="lora", seq_len=1024, batch_size=4)
    budget = parse_size("24GB")
    options = fit("llama-3.1-8b", s, budget)
    assert options and all(o.predicted_bytes <= budget for o in options)
    assert [o.cost for o in options] == sorted(o.cost for o in options)
    assert estimate("llama-3.1-8b", s).total_bytes > budget  # the unchanged run does not fit
    assert fit("llama-2-70b", Settings(method="qlora"), parse_size("15GiB")) == []


def test_cli_json_and_fit(capsys):
    from lorakit.recipes import estimate as recipe

    parser = argparse.ArgumentParser()
    recipe.add_arguments(parser)
    assert recipe.main(parser.parse_args(["--model", "llama-2-13b", "--method", "qlora", "--json"])) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_bytes"] == sum(data["components"].values())
    assert set(data["components"]) >= {"frozen_weights", "optimizer_state", "activations", "logits_loss"}
    assert recipe.main(parser.parse_args(["--model", "llama-2-70b", "--fit", "15GiB"])) == 1
    assert "does not fit in 15.00 GiB, even with" in capsys.readouterr().out
    assert recipe.main(parser.parse_args(["--model", "llama-2-7b", "--method", "lora", "--fit", "24GiB"])) == 0
    assert "fits in 24.00 GiB" in capsys.readouterr().out


def test_predict_for_run_reads_the_run_config_and_the_loaded_model(tmp_path):
    from lorakit import ModelConfig, RunConfig, TrainConfig
    from lorakit.config import DataConfig

    save_random_checkpoint({"model_type": "llama", **SMALL}, tmp_path, torch.bfloat16)
    cfg = RunConfig(model=ModelConfig(name_or_path=str(tmp_path), quantization="nf4", gradient_checkpointing=True),
                    lora=LoraConfig(r=4, target_modules=("q_proj", "v_proj")), data=DataConfig(max_seq_len=64),
                    train=TrainConfig(micro_batch_size=3, optimizer="adamw_8bit", precision="bf16"))
    model, _ = load_model(str(tmp_path), quantization="nf4", compute_dtype="bf16", device="cpu", load_tokenizer=False)
    add_lora(model, cfg.lora)
    s = settings_for_run(cfg, model, seq_len=40)
    assert (s.method, s.dtype, s.device, s.batch_size, s.seq_len, s.rank, s.grad_ckpt, s.optimizer) == \
        ("qlora", "bf16", "cpu", 3, 40, 4, True, "adamw_8bit")
    assert s.targets == ("q_proj", "v_proj")
    assert predict_for_run(cfg, model, seq_len=40) == estimate(model, s).peak_allocated_bytes
    assert settings_for_run(cfg).seq_len == 64 and settings_for_run(cfg).device == "cuda"


def test_fit_offers_checkpointing_without_replay_when_replay_does_not_fit():
    s = Settings(method="qlora", seq_len=4096, batch_size=1)
    replay = estimate("llama-2-7b", s, grad_ckpt=True).total_bytes
    plain = estimate("llama-2-7b", s, grad_ckpt=True, ckpt_replay=False).total_bytes
    assert plain < replay
    options = fit("llama-2-7b", s, (plain + replay) // 2, limit=50)
    assert options and all(o.predicted_bytes <= (plain + replay) // 2 for o in options)
    no_replay = [o for o in options if o.settings.grad_ckpt and not o.settings.ckpt_replay]
    assert no_replay and "gradient checkpointing without replay" in no_replay[0].changes
    assert not any(o.settings.grad_ckpt and o.settings.ckpt_replay and o.settings.seq_len == 4096
                   and o.settings.optimizer == "adamw_torch" for o in options)


def test_dequant_transient_asks_the_kernel_registry(monkeypatch):
    """The widest 4-bit weight's rebuild costs what the kernel that will run it allocates: the
    output alone with a fast kernel (C on the CPU, Triton on CUDA), the reference's peak otherwise."""
    from lorakit.memory.activations import dequant_bytes_per_weight
    from lorakit.quant import kernels
    from lorakit.quant.kernels import gpu

    cuda, cpu = Settings(device="cuda", dtype="bf16"), Settings(device="cpu", dtype="bf16")
    monkeypatch.setattr(gpu, "available", lambda: True)
    assert dequant_bytes_per_weight(cuda) == 2
    monkeypatch.setattr(gpu, "available", lambda: False)  # no Triton: the reference, one pass
    assert dequant_bytes_per_weight(cuda) == 6
    kernels.set_backend("reference")
    try:
        assert dequant_bytes_per_weight(cpu) == 2  # the CPU reference works in cache-sized chunks
    finally:
        kernels.set_backend(None)


def test_fsdp2_estimate_is_per_rank():
    """Under FSDP2 the decoder layers' weights, the LoRA weights, their gradients and the optimizer
    state divide by the ranks; the root unit and the QuantState stay whole; two layers are gathered."""
    one = estimate("llama-2-70b", Settings(method="qlora", seq_len=512, grad_ckpt=True))
    for world in (2, 4, 8):
        est = estimate("llama-2-70b", Settings(method="qlora", seq_len=512, grad_ckpt=True, world_size=world,
                                               strategy="fsdp2"))
        d = est.details["distributed"]
        assert est.components["frozen_weights"] == (d["replicated_bytes"] + d["sharded_layer_bytes"] // world
                                                    + d["gathered_layer_bytes"])
        assert d["replicated_bytes"] + d["sharded_layer_bytes"] == one.components["frozen_weights"]
        assert est.components["optimizer_state"] == one.components["optimizer_state"] // world
        assert est.components["activations"] == one.components["activations"]  # a rank's own micro-batch
    ddp = estimate("llama-2-70b", Settings(method="qlora", seq_len=512, grad_ckpt=True, world_size=2, strategy="ddp"))
    assert ddp.components["frozen_weights"] == one.components["frozen_weights"]
    assert ddp.total_bytes == one.total_bytes + 256 * 2**20  # + NCCL's buffers on a multi-GPU run
