"""Guards on the GPU with the real SDPA / SageAttention kernels, proven by the harness itself.

For each attention backend available here, the matrix's attention layout classes run through the
worker pool (device faults are isolated there) twice:

1. the raw ``attn.<backend>`` target: its contract is inferred from those results (this device,
   these versions) and compared with the contract the harness ships (measured on an H200, torch
   2.11): a clause that narrowed is a kernel/torch change the guard would not know about;
2. the guarded ``safe_attn.<backend>`` target (``safe_attention``, generated from the shipped
   contract): zero device faults, zero out-of-view reads (NaN poison reaching the output:
   ``nonfinite``), zero input writes, zero refusals.  Drift is allowed only where a named kernel
   defect that is not about layout explains it (SageAttention 1's short last key tile).

Backends that cannot run here skip with the registry's reason.
"""

from __future__ import annotations

import pytest

from harness.contract import diff_contracts, infer_contract, record_of
from harness.contracts import measured_contract, shipped_contracts
from harness.quant.backends import get_backend
from harness.targets import get_target, known_defect_of

pytestmark = pytest.mark.gpu

BACKENDS = [
    "sdpa",
    "sdpa.flash",
    "sdpa.efficient",
    "sdpa.cudnn",
    "sdpa.math",
    "sage1.sageattn",
    "sage1.sageattn_varlen",
]
CASES_PER_CLASS = 3
LAYOUT_FAILURES = {
    "device_fault",
    "nonfinite",
    "input_mutation",
    "rejected",
    "worker_crash",
    "timeout",
    "error",
    "layout_noninvariance",
}


def _available(backend: str) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ok, why = get_backend(backend).available("cuda")
    if not ok:
        pytest.skip(f"{backend}: {why}")


def _sweep(pool, target_name: str) -> list:
    target = get_target(target_name)
    cases = [f.build(i) for f in target.layout_classes().values() for i in range(CASES_PER_CLASS)]
    return list(zip(cases, pool.run(cases)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_measured_contract_here_has_not_narrowed_from_the_shipped_one(pool, backend: str) -> None:
    _available(backend)
    shipped = measured_contract(f"attn.{backend}")
    if shipped is None:
        pytest.skip(f"no shipped contract for attn.{backend}")
    results = _sweep(pool, f"attn.{backend}")
    live = infer_contract([record_of(c, r) for c, r in results], f"attn.{backend}", env={"device": "this GPU"})
    changes = diff_contracts(
        {**shipped_contracts(), "contracts": {f"attn.{backend}": shipped}},
        {**shipped_contracts(), "contracts": {f"attn.{backend}": live}},
    )
    narrowed = [c for c in changes if c["change"] == "narrowed"]
    assert not narrowed, "\n".join(f"{c['key']}: OLD {c['old']} | NEW {c['new']}" for c in narrowed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_guarded_backend_runs_every_layout_class_clean(pool, backend: str) -> None:
    _available(backend)
    results = _sweep(pool, f"safe_attn.{backend}")
    bad = []
    for case, r in results:
        v = r.verdict.value
        if v in LAYOUT_FAILURES or (v == "drift" and not known_defect_of(case, r)):
            bad.append(f"{case.params['layout_class']}: {r.summary()}")
    assert not bad, "\n".join(bad)


def test_fresh_cuda_allocations_are_at_least_256_byte_aligned() -> None:
    """What the guard's copies start from (it checks the pointer anyway: ``harness.guard.aligned_empty``)."""
    import torch

    from harness.guard import aligned_empty
    from harness.layouts import data_ptr_alignment

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    keep = [
        torch.empty(n, dtype=torch.bfloat16, device="cuda") for n in (1, 3, 7, 100, 4097, 1 << 20) for _ in range(8)
    ]
    assert min(data_ptr_alignment(t) for t in keep) >= 256
    assert data_ptr_alignment(aligned_empty((5, 3), torch.bfloat16, "cuda", 256)) >= 256
