"""quant/dynamic.py's lookup-table cache: found by the code tensor's identity (no read of its
values, so no device-to-host sync on CUDA), rebuilt when the code changes in place."""

import pytest
import torch

from lorakit.quant import dynamic
from lorakit.quant.dynamic import create_dynamic_map, quantize_blockwise


class _Refuse(dict):
    def get(self, *a, **k):
        raise AssertionError("the cache read the code's values again")


def test_second_call_with_the_same_code_does_not_read_its_values(monkeypatch):
    dynamic.clear_lookup_tables()
    code = create_dynamic_map(signed=True)
    x = torch.randn(1000)
    first = quantize_blockwise(x, code, 256)
    monkeypatch.setattr(dynamic, "_LUT_BY_VALUES", _Refuse())
    second = quantize_blockwise(x, code, 256)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_in_place_change_of_the_code_rebuilds_the_table():
    dynamic.clear_lookup_tables()
    code = create_dynamic_map(signed=True)
    before = dynamic._lookup_table(code, torch.device("cpu")).clone()
    fresh = create_dynamic_map(signed=False)
    code.copy_(fresh)  # _version bumps
    after = dynamic._lookup_table(code, torch.device("cpu"))
    assert not torch.equal(before, after)
    assert torch.equal(after, dynamic._build_lookup_table(fresh))


def test_a_new_tensor_with_equal_values_shares_the_table():
    dynamic.clear_lookup_tables()
    a = dynamic._lookup_table(create_dynamic_map(signed=True), torch.device("cpu"))
    b = dynamic._lookup_table(create_dynamic_map(signed=True), torch.device("cpu"))
    assert a is b


@pytest.mark.gpu
def test_quantize_blockwise_on_cuda_has_no_host_sync_after_the_first_call():
    dynamic.clear_lookup_tables()
    code = create_dynamic_map(signed=True).cuda()
    x = torch.randn(10_000, device="cuda")
    first = quantize_blockwise(x, code, 256)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = quantize_blockwise(x, code, 256)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    cpu = quantize_blockwise(x.cpu(), code.cpu(), 256)  # the same bytes as on the CPU
    assert torch.equal(cpu[0], second[0].cpu()) and torch.equal(cpu[1], second[1].cpu())
