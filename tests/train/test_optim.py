"""lorakit.train.optim: parity with torch.optim.AdamW and bitsandbytes, state size, exact resume."""

import pytest
import torch

from lorakit.train.optim import (
    BLOCKSIZE,
    MIN_8BIT_SIZE,
    OPTIMIZER_NAMES,
    AdamW8bit,
    build_optimizer,
    state_bytes,
)

LR, WD = 3e-3, 0.1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: on shared, busy cores two intra-op threads are ~100x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(config).float()


def fixed_batch(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (4, 32), generator=g)  # [batch, seq]


def train_llama(make_optimizer, steps: int, trainable=lambda name: True):
    """Fit a tiny random Llama to one fixed token batch; returns (losses, params per step)."""
    model = tiny_llama()
    params = [p for n, p in model.named_parameters() if trainable(n)]
    for n, p in model.named_parameters():
        p.requires_grad_(trainable(n))
    opt = make_optimizer(params)
    ids = fixed_batch()
    losses, history = [], []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        history.append([p.detach().clone() for p in params])
    return losses, history


def test_unknown_name_lists_allowed_names():
    with pytest.raises(ValueError) as err:
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], "adamw_9bit", lr=1e-3)
    for name in OPTIMIZER_NAMES:
        assert name in str(err.value)
    assert "adamw_9bit" in str(err.value)


def test_paged_32bit_matches_torch_adamw_step_for_step():
    trainable = lambda n: "q_proj" in n or "v_proj" in n or "norm" in n  # noqa: E731
    ref = lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD)  # noqa: E731
    ours = lambda ps: build_optimizer(ps, "paged_adamw_32bit", lr=LR, weight_decay=WD)  # noqa: E731
    ref_losses, ref_hist = train_llama(ref, 20, trainable)
    our_losses, our_hist = train_llama(ours, 20, trainable)
    assert ref_losses[-1] < ref_losses[0]  # it trains
    for ref_params, our_params in zip(ref_hist, our_hist):
        for a, b in zip(ref_params, our_params):
            assert (a - b).abs().max().item() <= 1e-6


def test_adamw_torch_fast_kernel_matches_reference_adamw():
    """adamw_torch picks torch's fused kernel (measured fastest); check it against the default."""
    ref = lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, foreach=False)  # noqa: E731
    fast = lambda ps: build_optimizer(ps, "adamw_torch", lr=LR, weight_decay=WD)  # noqa: E731
    opt = fast([torch.nn.Parameter(torch.zeros(3))])
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    _, ref_hist = train_llama(ref, 10)
    _, fast_hist = train_llama(fast, 10)
    for a, b in zip(ref_hist[-1], fast_hist[-1]):
        assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_state_bytes_and_fp32_for_small_tensors(name):
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(1024, 1024))        # 1,048,576 elements: 8-bit state
    small = torch.nn.Parameter(torch.randn(MIN_8BIT_SIZE - 1))  # under bnb's min_8bit_size: fp32
    opt = build_optimizer([big, small], name, lr=1e-3)
    for p in (big, small):
        p.grad = torch.randn_like(p)
    opt.step()
    st_big, st_small = opt.state[big], opt.state[small]
    assert st_big["exp_avg_codes"].dtype == torch.uint8 and st_big["exp_avg_sq_codes"].dtype == torch.uint8
    assert st_big["exp_avg_absmax"].numel() == big.numel() // BLOCKSIZE
    assert st_small["exp_avg"].dtype == torch.float32 and st_small["exp_avg_sq"].dtype == torch.float32
    small_bytes = 8 * small.numel()  # two fp32 moments
    big_per_param = (state_bytes(opt) - small_bytes) / big.numel()
    assert 2.0 <= big_per_param <= 2.1
    assert big_per_param == 2 + 2 * 4 / BLOCKSIZE  # two uint8 codes + two fp32 absmax per 256


def test_8bit_final_loss_close_to_fp32_and_bitsandbytes():
    """100 steps fitting a fixed batch (lr 3e-4: loss 4.83 -> ~2.1, still far from memorised,
    so optimizer differences show). "Close":
    - to fp32 AdamW: final loss within 2% (8-bit moments are an approximation; measured 0.14%);
    - to bitsandbytes' AdamW8bit: within 0.5%. Both store the same bytes (same maps, blocks of
      256, same rounding), so only fp32 rounding differs (measured 0.005%). The tighter bound
      catches scheme errors the 2% bound misses: blocks of 2048 instead of 256 moved the final
      loss 0.9%; the signed map for the second moment moved it 3.3%.
    Step 1 uses exact moments in both (state starts at zero), so those params agree to 1e-6."""
    bnb = pytest.importorskip("bitsandbytes")
    lr = 3e-4
    fp32 = lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=WD)  # noqa: E731
    ours = lambda ps: build_optimizer(ps, "adamw_8bit", lr=lr, weight_decay=WD)  # noqa: E731
    theirs = lambda ps: bnb.optim.AdamW8bit(ps, lr=lr, weight_decay=WD)  # noqa: E731
    fp32_losses, _ = train_llama(fp32, 100)
    our_losses, our_hist = train_llama(ours, 100)
    bnb_losses, bnb_hist = train_llama(theirs, 100)
    assert our_losses[-1] < 0.7 * our_losses[0]  # it actually fits
    assert abs(our_losses[-1] - fp32_losses[-1]) <= 0.02 * fp32_losses[-1]
    assert abs(our_losses[-1] - bnb_losses[-1]) <= 0.005 * bnb_losses[-1]
    for a, b in zip(our_hist[0], bnb_hist[0]):
        assert (a - b).abs().max().item() <= 1e-6
    print(f"final loss: fp32 {fp32_losses[-1]:.4f}  lorakit 8-bit {our_losses[-1]:.4f}  "
          f"bnb 8-bit {bnb_losses[-1]:.4f}  (start {fp32_losses[0]:.4f})")


def test_8bit_codes_equal_bitsandbytes():
    """Same codes as bitsandbytes after a few steps on a >= 4096-element tensor."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.1
    ours_p, bnb_p = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = AdamW8bit([ours_p], lr=1e-2, weight_decay=WD)
    theirs = bnb.optim.AdamW8bit([bnb_p], lr=1e-2, weight_decay=WD)
    for _ in range(3):
        g = torch.randn_like(w)
        ours_p.grad, bnb_p.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    a, b = ours.state[ours_p], theirs.state[bnb_p]
    assert torch.equal(a["exp_avg_codes"], b["state1"])
    assert torch.equal(a["exp_avg_sq_codes"], b["state2"])
    assert torch.allclose(a["exp_avg_absmax"], b["absmax1"], rtol=1e-5, atol=0)
    assert torch.allclose(a["exp_avg_sq_absmax"], b["absmax2"], rtol=1e-5, atol=0)


def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)  # 64x128 = 8192 weights (8-bit state), the rest under 4096 (fp32 state)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8))


def mlp_steps(model, opt, first: int, last: int) -> None:
    for step in range(first, last):
        g = torch.Generator().manual_seed(step)  # batch depends only on the step index
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_resume_from_saved_state_is_bit_exact(name, tmp_path):
    model = tiny_mlp()
    opt = build_optimizer(model.parameters(), name, lr=LR, weight_decay=WD)
    mlp_steps(model, opt, 0, 8)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model = tiny_mlp()
    opt = build_optimizer(model.parameters(), name, lr=LR, weight_decay=WD)
    mlp_steps(model, opt, 0, 4)
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = {k: v for k, v in opt.state_dict()["state"].items()}

    model = tiny_mlp()  # fresh objects, as after a restart
    opt = build_optimizer(model.parameters(), name, lr=LR, weight_decay=WD)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    for pid, state in opt.state_dict()["state"].items():  # same dtypes and values as saved
        for key, value in state.items():
            if torch.is_tensor(value):
                assert value.dtype == saved[pid][key].dtype and torch.equal(value, saved[pid][key])
    mlp_steps(model, opt, 4, 8)
    for a, b in zip(uninterrupted, model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits_name", ["paged_adamw_32bit", "paged_adamw_8bit"])
def test_load_keeps_state_dtype_for_bf16_params(bits_name):
    """torch's default load casts state to the param dtype; fp32 moments / uint8 codes must stay."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 128).bfloat16())
    opt = build_optimizer([p], bits_name, lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
    opt.load_state_dict(opt.state_dict())
    for key, value in before.items():
        assert opt.state[p][key].dtype == value.dtype != torch.bfloat16
        assert torch.equal(opt.state[p][key], value)


def test_paged_8bit_equals_unpaged_8bit_on_cpu():
    _, unpaged = train_llama(lambda ps: build_optimizer(ps, "adamw_8bit", lr=LR, weight_decay=WD), 5)
    _, paged = train_llama(lambda ps: build_optimizer(ps, "paged_adamw_8bit", lr=LR, weight_decay=WD), 5)
    for a_step, b_step in zip(unpaged, paged):
        for a, b in zip(a_step, b_step):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [32, 8])
def test_paged_state_lives_on_host_and_matches_unpaged_on_cuda(bits):
    torch.manual_seed(0)
    w = torch.randn(1024, 1024, device="cuda")
    factories = {  # paged first, then the unpaged reference (same single-tensor math)
        32: [lambda ps: build_optimizer(ps, "paged_adamw_32bit", lr=1e-3, weight_decay=WD),
             lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=WD, foreach=False)],
        8: [lambda ps: build_optimizer(ps, "paged_adamw_8bit", lr=1e-3, weight_decay=WD),
            lambda ps: build_optimizer(ps, "adamw_8bit", lr=1e-3, weight_decay=WD)],
    }
    grads = [torch.randn_like(w) for _ in range(3)]  # allocated before measuring
    results = []
    for make in factories[bits]:
        p = torch.nn.Parameter(w.clone())
        opt = make([p])
        before = torch.cuda.memory_allocated()
        for grad in grads:
            p.grad = grad
            opt.step()
        results.append((p.detach().clone(), torch.cuda.memory_allocated() - before, opt))
    (paged_p, paged_growth, paged_opt), (ref_p, ref_growth, _) = results
    assert (paged_p - ref_p).abs().max().item() <= 1e-6
    assert ref_growth >= 2 * w.numel()  # unpaged state sits on the GPU ...
    assert paged_growth < 0.01 * ref_growth  # ... paged state does not
    for state in paged_opt.state.values():
        for t in state.values():
            if torch.is_tensor(t):
                assert t.device.type == "cpu" and t.is_pinned()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_cuda_steps_have_no_host_sync_and_state_dict_waits_for_the_copies(name):
    """After the first step (which builds the 8-bit lookup tables once), a step queues its work
    without any device-to-host sync: no per-block table key read back (quant/dynamic.py), and paged
    state's copies back to pinned host memory are waited for only by state_dict()."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(256, 64, device="cuda")) for _ in range(3)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = build_optimizer(ps, name, lr=1e-3, weight_decay=WD)
    if name == "paged_adamw_32bit":  # the unpaged reference of each: same math, state on the GPU
        ref_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=WD, foreach=False)
    else:
        ref_opt = build_optimizer(ref, "adamw_8bit", lr=1e-3, weight_decay=WD)
    grads = [[torch.randn_like(p) for p in ps] for _ in range(3)]
    for i, step_grads in enumerate(grads):
        for p, r, g in zip(ps, ref, step_grads):
            p.grad, r.grad = g, g.clone()
        if i:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref_opt.step()
    state = opt.state_dict()["state"]
    for p, r in zip(ps, ref):
        assert (p - r).abs().max().item() <= 1e-6
    if name.startswith("paged_"):
        assert all(t.device.type == "cpu" and t.is_pinned() for s in state.values() for t in s.values()
                   if torch.is_tensor(t))
        ref_state = ref_opt.state_dict()["state"]
        for key in state[0]:
            if torch.is_tensor(state[0][key]) and key in ref_state[0]:
                torch.testing.assert_close(state[0][key], ref_state[0][key].cpu(), rtol=0, atol=1e-6)
