"""Small GPU outputs are judged on host copies (``metrics.HOST_JUDGE_ELEMENTS``), large ones on the GPU; the
report is the same either way. Skipped without CUDA by conftest.py."""

from __future__ import annotations

import math

import pytest
import torch

from harness.reference import metrics
from harness.reference.metrics import HOST_JUDGE_ELEMENTS, error_report, on_host_if_small

pytestmark = pytest.mark.gpu


def test_small_device_tensors_come_back_as_host_copies_and_large_ones_stay():
    a = torch.randn(HOST_JUDGE_ELEMENTS // 2, device="cuda")
    b = torch.randn(HOST_JUDGE_ELEMENTS // 2, device="cuda")
    ha, hb = on_host_if_small(a, b)
    assert ha.device.type == "cpu" and hb.device.type == "cpu"
    assert torch.equal(ha, a.cpu()) and torch.equal(hb, b.cpu())
    big = torch.randn(HOST_JUDGE_ELEMENTS + 1, device="cuda")
    (same,) = on_host_if_small(big)
    assert same is big


@pytest.mark.parametrize("n", [1000, HOST_JUDGE_ELEMENTS + 1000])
def test_the_report_does_not_depend_on_where_it_was_computed(n, monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(n)
    ref = torch.randn(n, device="cuda", generator=g, dtype=torch.float64)
    out = (ref + 1e-3 * torch.randn(n, device="cuda", generator=g, dtype=torch.float64)).to(torch.bfloat16)
    out[::97] = float("nan")
    on_host = error_report(out.cpu(), ref.cpu())
    monkeypatch.setattr(metrics, "HOST_JUDGE_ELEMENTS", 0)  # never on the host: the GPU path
    on_gpu = error_report(out, ref)
    assert on_host.nonfinite_out == on_gpu.nonfinite_out == len(range(0, n, 97))
    assert on_host.max_abs == on_gpu.max_abs  # a max does not depend on the order of reduction
    for name in ("mean_abs", "rmse", "rel_l1", "cosine", "sqnr_db"):
        a, b = getattr(on_host, name), getattr(on_gpu, name)
        # float64 sums of n terms in another order: within n ulps of the larger
        assert math.isclose(a, b, rel_tol=n * 2.0**-52, abs_tol=0.0), (name, a, b)
