"""The shipped measured contracts and the layout-safe attention wrapper generated from them (CPU, metadata only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cases import load_case
from harness.contract import diff_contracts, validate_contracts
from harness.contracts import measured_contract, shipped_contracts
from harness.layouts import LayoutSpec
from harness.quant.attention import plan_attention
from harness.quant.backends import BACKENDS
from harness.targets.corpus import load_corpus

REPO = Path(__file__).resolve().parents[2]
SPEC = LayoutSpec((1, 2, 64, 64), "bfloat16")


def test_every_shipped_clause_carries_device_versions_counts_and_source() -> None:
    doc = validate_contracts(shipped_contracts())
    assert doc["contracts"]
    for op, c in doc["contracts"].items():
        assert op.startswith("attn.") and op[len("attn.") :] in BACKENDS
        for cl in c["preconditions"]:
            assert cl["measured_on"]["device"] == "NVIDIA H200" and cl["measured_on"]["torch"].startswith("2.11")
            assert cl["violated"]["failed"] == cl["violated"]["cases"] > 0  # all failures on the violating side
            assert cl["satisfied"]["cases"] + cl["violated"]["cases"] == c["counted"]
            left = cl["satisfied"]["failed"] - cl["satisfied"].get("explained_by_other_clauses", 0)
            assert 0 <= left <= c["unexplained"]["failures"]  # the rest: no separating boundary (said, counted)
            assert cl["source"] and cl["bound_source"]
        assert sum(c["by_verdict"].values()) == c["counted"]


def test_every_layout_failure_in_the_corpus_violates_its_ops_shipped_contract() -> None:
    """The regression corpus backs the contracts: each attn.* misalignment case would be repaired."""
    seen = 0
    for entry in load_corpus(REPO / "tests" / "cases"):
        contract = measured_contract(entry.op)
        if contract is None or not entry.layout_class.startswith("misaligned"):
            continue
        case, _ = load_case(REPO / "tests" / "cases" / entry.file)
        be = entry.op[len("attn.") :]
        acts = plan_attention(be, case.layouts["q"], case.layouts["k"], case.layouts["v"], case.params["tensor_layout"])
        copies = {a.tensor for a in acts if a.is_copy}
        assert copies == {"q", "k", "v"}, (entry.file, [str(a) for a in acts])
        assert all("pointer alignment >= 16 B violated" in a.why for a in acts if a.is_copy)
        seen += 1
    assert seen >= 8  # sdpa, sdpa.cudnn, sdpa.flash (2, 4, 8 B each) and sdpa.efficient (8 B)


@pytest.mark.parametrize("backend", ["sdpa", "sdpa.flash", "sdpa.efficient", "sdpa.cudnn"])
def test_sdpa_kernels_copy_misaligned_inputs_on_measured_evidence(backend: str) -> None:
    mis = SPEC.replace(offset=1)
    acts = plan_attention(backend, mis, SPEC, SPEC, "HND")
    (a,) = acts
    assert a.tensor == "q" and "measured: 16 of 16 violating cases failed" in a.why and "NVIDIA H200" in a.why
    assert plan_attention(backend, SPEC, SPEC, SPEC, "HND") == []  # compliant: nothing copied


def test_flash_last_stride_comes_from_the_contract_and_stride_alignment_stays_hand_written() -> None:
    (a,) = plan_attention("sdpa.flash", SPEC.replace(step=(1, 1, 1, 2)), SPEC, SPEC, "HND")
    assert "q last-dim stride is 1 violated" in a.why and "5 of 5" in a.why
    assert "hand-written rule: stride_alignment not measured for sdpa.flash" in a.why


def test_math_kernel_measured_clean_copies_nothing() -> None:
    assert plan_attention("sdpa.math", SPEC.replace(offset=1), SPEC, SPEC, "HND") == []


def test_sage1_write_is_measured_and_its_alignment_stays_hand_written() -> None:
    acts = {a.tensor: a.why for a in plan_attention("sage1.sageattn", SPEC.replace(offset=1), SPEC, SPEC, "HND")}
    assert "written in 66 of 66 checked cases" in acts["k"]
    assert "hand-written rule: alignment not measured for sage1.sageattn" in acts["q"]
    assert plan_attention("sage1.sageattn", SPEC, SPEC, SPEC, "HND", smooth_k=False) == []


def test_a_backend_without_a_measured_contract_keeps_the_hand_written_rules() -> None:
    assert measured_contract("attn.sage3") is None
    acts = {a.tensor: a.why for a in plan_attention("sage3", SPEC.replace(offset=1), SPEC, SPEC, "HND")}
    assert "no measured contract for sage3" in acts["q"] and "declared in harness.quant.backends" in acts["k"]


def test_the_raw_op_against_the_guarded_one_is_a_widening_diff() -> None:
    """``contract --diff`` between a raw kernel and a kernel that needs nothing (its guarded form)."""
    doc = shipped_contracts()
    flash = doc["contracts"]["attn.sdpa.flash"]
    guarded = dict(flash, preconditions=[], observed={"q:alignment": [[2, 5, 0], [8, 5, 0]]})
    new = dict(doc, contracts={"attn.sdpa.flash": guarded})
    changes = diff_contracts({**doc, "contracts": {"attn.sdpa.flash": flash}}, new)
    q = [c for c in changes if c["key"] == "q:alignment:min"]
    assert q and q[0]["change"] == "widened" and "16 failed in 16" in q[0]["old"]
    assert not [c for c in changes if c["change"] == "narrowed"]


def test_unforced_sdpa_on_the_cpu_runs_through_its_measured_guard() -> None:
    """The measured path end to end with tensors: misaligned NHD views in, aligned copies to the kernel,
    the caller's tensors and the poison around them untouched, the same result as plain inputs."""
    import torch

    from harness.layouts import materialize, poison_intact
    from harness.quant.attention import safe_attention

    spec = LayoutSpec((1, 40, 2, 64), "bfloat16", perm=(0, 2, 1, 3), offset=3)  # NHD view of HND memory, 6 B
    vals = [torch.randn(spec.shape) for _ in range(3)]
    q, k, v = (materialize(spec, x) for x in vals)
    before = [t.clone() for t in (q, k, v)]
    out, actions = safe_attention("sdpa", q, k, v, "NHD")
    copies = [a for a in actions if a.is_copy]
    assert {a.tensor for a in copies} == {"q", "k", "v"}
    assert all("pointer alignment >= 16 B violated (alignment is 2" in a.why for a in copies)
    for t, b in zip((q, k, v), before):
        assert torch.equal(t, b) and poison_intact(t, spec)
    ref, plain_actions = safe_attention("sdpa", *(x.to(torch.bfloat16) for x in vals), "NHD")
    assert not [a for a in plain_actions if a.is_copy] and torch.equal(out, ref)
