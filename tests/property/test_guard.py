"""Generated guards on the CPU, proven by the harness itself.

A CPU "kernel" with planted layout requirements runs through the matrix's layout classes; its
contract is inferred from those results (``harness.contract``), the guard generated from that
contract wraps it, and the same cases through the guarded op give zero faults, zero out-of-view
reads (the runner's poison checks) and zero input writes.  Plus: no copy for compliant operands
(data pointer identity), one clear error for what no copy can fix, and the repairs recorded.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from harness.contract import infer_contract, record_of
from harness.guard import GuardError, aligned_copy, aligned_empty, guard, layout_facts
from harness.layouts import LayoutSpec, data_ptr_alignment, materialize, poison_intact
from harness.reference.metrics import Bound
from harness.runner import targets as registry
from harness.runner.execute import run_case
from harness.targets.attention import AttentionTarget
from harness.targets.base import ClassTarget, materialize_inputs
from harness.targets.layout_classes import classes_for
from harness.values import ValueSpec

CASES_PER_CLASS = 3


# ------------------------------------------------------------------------------ planted kernels


def _vector_load(t: torch.Tensor) -> torch.Tensor:
    """What a kernel issuing 16-byte loads from the pointer rounded down to 16 bytes reads: for a
    misaligned view, the bytes before it (outside the view) instead of its own first elements."""
    skip = (t.data_ptr() % 16) // t.element_size()
    return torch.as_strided(t, t.shape, t.stride(), t.storage_offset() - skip) if skip else t


def planted_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Needs x's last-dim stride 1 (else raises) and a 16-byte aligned x (else reads outside the view);
    saturates x to +-448 *in place* (writes x when values lie beyond, like the legacy FP8 forwards)."""
    if x.stride(-1) != 1:
        raise RuntimeError(f"planted_linear: x last-dim stride {x.stride(-1)}, needs 1")
    xr = _vector_load(x)
    x.clamp_(-448.0, 448.0)  # also raises on a stride-0 (broadcast) x: one element, many places
    return (xr.float() @ weight.float().T).to(torch.bfloat16)


def planted_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> torch.Tensor:
    """Needs last-dim stride 1 (else raises) and 16-byte aligned q/k/v (else reads outside the view)."""
    for n, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise RuntimeError(f"planted_attention: {n} last-dim stride {t.stride(-1)}, needs 1")
    q, k, v = (_vector_load(t).float() for t in (q, k, v))
    if layout == "NHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v).to(torch.bfloat16)
    return out.transpose(1, 2) if layout == "NHD" else out


class PlantedLinear(ClassTarget):
    """``x @ W.T`` of x saturated to +-448, swept through the linear layout classes (kind cpu-test,
    so the real matrix never picks it up)."""

    name = "test.planted_linear"
    kind = "cpu-test"
    fn = staticmethod(planted_linear)

    def layout_classes(self):
        from harness.targets.base import CaseFactory

        return {n: CaseFactory(self, lc) for n, lc in classes_for("linear", self.context()).items()}

    def case_from_draw(self, draw, class_name, seed):
        k, n = draw.params["in_features"], draw.params["out_features"]
        return self._case(
            draw,
            class_name,
            seed,
            layouts={"weight": LayoutSpec.contiguous((n, k), "bfloat16")},
            values={"weight": ValueSpec("normal", seed)},
        )

    def make_inputs(self, case, device, values=None):
        return materialize_inputs(case, device, values)

    def run(self, inputs, params):
        return self.fn(inputs["x"], inputs["weight"])

    def reference(self, inputs, params):
        x, w = inputs["x"].clamp(-448.0, 448.0), inputs["weight"]
        exact = x.double() @ w.double().T
        return exact, (x.contiguous() @ w.T).to(torch.bfloat16)  # same-precision naive run

    def bound(self, inputs, params, exact):
        return Bound.derived(2.0, exact, torch.bfloat16, why="2 x the same-precision naive run's error")

    def layout_bound(self, inputs, params, exact):
        return self.bound(inputs, params, exact)


class PlantedAttention(AttentionTarget):
    name = "test.planted_attention"
    kind = "cpu-test"
    backend_name = "test.planted"
    backend_layouts = ("HND", "NHD")
    fn = staticmethod(planted_attention)

    def layout_classes(self):
        from harness.targets.base import CaseFactory

        return {n: CaseFactory(self, lc) for n, lc in classes_for("attention", self.context()).items()}

    def available(self, device):
        return True, ""

    def invoke(self, q, k, v, layout, **kw):
        return self.fn(q, k, v, layout)

    def emulated(self, q, k, v, layout):
        from harness.reference.attention import naive_attention

        return naive_attention(q, k, v, layout)


@pytest.fixture
def planted():
    made = []

    def register(cls: type, name: str, fn: Any) -> Any:
        t = type(cls.__name__ + "_" + name.replace(".", "_"), (cls,), {"name": name, "fn": staticmethod(fn)})()
        registry.register_target(t, replace=True)
        made.append(name)
        return t

    yield register
    for n in made:
        registry.unregister_target(n)


def _sweep(target: Any) -> list[tuple[Any, Any]]:
    out = []
    for factory in target.layout_classes().values():
        for i in range(CASES_PER_CLASS):
            case = factory.build(i)
            out.append((case, run_case(case, "cpu")))
    return out


def _contract_of(target: Any) -> tuple[dict, list]:
    results = _sweep(target)
    return infer_contract(
        [record_of(c, r) for c, r in results], target.name, env={"device": "cpu", "torch": torch.__version__}
    ), results


def _keys(contract: dict) -> set[str]:
    return {c["key"] for c in contract["preconditions"]}


# ------------------------------------------------------------------------------ proven on the layout classes


def test_linear_guard_from_the_measured_contract_runs_every_layout_class_clean(planted) -> None:
    raw = planted(PlantedLinear, "test.planted_linear", planted_linear)
    contract, raw_results = _contract_of(raw)
    verdicts = {r.verdict.value for _, r in raw_results}
    assert {"nonfinite", "rejected", "input_mutation", "pass"} <= verdicts  # the planted defects showed
    # the planted requirements were measured back: 16-byte alignment (offset_16 is the aligned control),
    # last-dim stride 1, no stride-0 dim; x written, only for values beyond 448
    al = next(c for c in contract["preconditions"] if c["key"] == "x:alignment:min")
    assert (
        al["bound"] == 16
        and al["nearest_failing"] == 8
        and al["violated"]["by_verdict"] == {"nonfinite": al["violated"]["cases"]}
    )
    assert {"x:last_stride_one:min", "x:no_stride0:min"} <= _keys(contract)
    assert contract["unexplained"]["failures"] == 0
    (w,) = contract["writes"]
    assert w["operand"] == "x" and not w["always"] and w["when"][0]["key"] == "x:values:one_of"

    g = guard(planted_linear, contract)
    safe = planted(PlantedLinear, "test.guarded_linear", g)
    results = _sweep(safe)
    bad = [(c.params["layout_class"], r.summary()) for c, r in results if r.verdict.value != "pass"]
    assert not bad  # no fault, no out-of-view read (nonfinite from the poison), no input write, no drift
    assert len(results) == len(raw_results)


def test_attention_guard_from_the_measured_contract_runs_every_layout_class_clean(planted) -> None:
    raw = planted(PlantedAttention, "test.planted_attention", planted_attention)
    contract, raw_results = _contract_of(raw)
    assert {r.verdict.value for _, r in raw_results} >= {"nonfinite", "rejected", "pass"}
    assert {f"{n}:alignment:min" for n in "qkv"} | {f"{n}:last_stride_one:min" for n in "qkv"} <= _keys(contract)
    g = guard(planted_attention, contract)
    safe = planted(PlantedAttention, "test.guarded_attention", g)
    results = _sweep(safe)
    assert not [(c.params["layout_class"], r.summary()) for c, r in results if r.verdict.value != "pass"]


# ------------------------------------------------------------------------------ the wrapper itself


def _contract(**over: Any) -> dict:
    """A hand-built contract: q 16-byte alignment, q last-dim stride 1, k written, q head dim in {64}."""

    def clause(operand, feature, kind, bound):
        return {
            "key": f"{operand}:{feature}:{kind}",
            "operand": operand,
            "feature": feature,
            "kind": kind,
            "bound": bound,
            "nearest_failing": None,
            "text": f"{operand} {feature} {kind} {bound}",
            "satisfied": {"cases": 10, "failed": 0, "by_verdict": {}},
            "violated": {"cases": 4, "failed": 4, "by_verdict": {"device_fault": 4}},
            "measured_on": {"device": "test"},
        }

    c = {
        "op": "t",
        "preconditions": [
            clause("q", "alignment", "min", 16),
            clause("q", "last_stride_one", "min", True),
            clause("q", "last_dim", "one_of", [64]),
        ],
        "writes": [{"operand": "k", "written": 3, "checked": 3, "always": True}],
    }
    c.update(over)
    return c


def _op(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    k.add_(1)
    return q.float().sum() + k.float().sum()


def test_compliant_operands_are_passed_through_without_a_copy() -> None:
    seen = {}

    def op(q, k):
        seen["q"], seen["k"] = q.data_ptr(), k.data_ptr()
        return q

    g = guard(op, _contract(writes=[]))
    q, k = torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(3, 5)
    out, repairs = g.call(q, k)
    assert repairs == [] and out is q
    assert seen == {"q": q.data_ptr(), "k": k.data_ptr()}


def test_each_violation_is_repaired_once_with_why_and_the_caller_is_untouched() -> None:
    spec = LayoutSpec((2, 4, 64), "bfloat16", offset=1, step=(1, 1, 1))
    q = materialize(spec, torch.randn(spec.shape))
    k = torch.zeros(4)
    k0, q0 = k.clone(), q.clone()
    g = guard(_op, _contract())
    out, repairs = g.call(q, k)
    assert [(r.operand, r.action) for r in repairs] == [("q", "copy"), ("k", "copy")]
    assert "q alignment min 16 violated (alignment is 2" in repairs[0].why and "4 of 4" in repairs[0].why
    assert "writes to its k input" in repairs[1].why
    assert torch.equal(k, k0) and torch.equal(q, q0) and poison_intact(q, spec)
    assert float(out) == pytest.approx(float(q0.float().sum()) + 4.0)
    assert g.last_repairs == repairs
    # the plan says the same from metadata alone, without running the op
    assert [r.operand for r in g.plan(spec, LayoutSpec.contiguous((4,), "float32"))] == ["q", "k"]


def test_a_strided_operand_gets_one_dense_aligned_copy() -> None:
    spec = LayoutSpec((2, 64), "bfloat16", step=(1, 2), offset=3)
    q = materialize(spec, torch.randn(spec.shape))
    got = {}

    def op(q, k):
        got["q"] = q
        return q

    guard(op, _contract(writes=[]))(q, torch.zeros(1))
    assert got["q"].stride() == (64, 1) and data_ptr_alignment(got["q"]) >= 16 and torch.equal(got["q"], q)


def test_what_a_copy_cannot_fix_raises_one_clear_error() -> None:
    g = guard(_op, _contract())
    with pytest.raises(GuardError, match=r"q has last_dim 80, outside its measured contract .*a copy cannot"):
        g(torch.zeros(2, 80, dtype=torch.bfloat16), torch.zeros(1))


def test_contiguous_does_not_realign_but_the_guard_copy_does() -> None:
    spec = LayoutSpec((4, 64), "bfloat16", offset=1)
    x = materialize(spec, torch.randn(spec.shape))
    assert x.contiguous().data_ptr() == x.data_ptr() and data_ptr_alignment(x.contiguous()) == 2
    for need in (16, 64, 256):
        y = aligned_copy(x, need)
        assert (
            data_ptr_alignment(y) >= need
            and torch.equal(y, x)
            and y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        )


def test_fresh_cpu_allocations_are_64_byte_aligned_and_aligned_empty_goes_further() -> None:
    keep = [torch.empty(n, dtype=torch.bfloat16) for n in (1, 3, 7, 100, 4097) for _ in range(10)]
    assert min(data_ptr_alignment(t) for t in keep) >= 64  # the CPU allocator's alignment (checked, not assumed)
    assert data_ptr_alignment(aligned_empty((5, 3), torch.bfloat16, "cpu", 256)) == 256


def test_layout_facts_of_a_tensor_match_its_spec() -> None:
    spec = LayoutSpec((2, 3, 8), "bfloat16", offset=4, step=(1, 2, 1), pad=(0, 1, 0))
    t = materialize(spec, torch.randn(spec.shape))
    from harness.contract import operand_facts

    assert layout_facts(t) == operand_facts(spec)


def test_guard_refuses_what_is_not_a_contract() -> None:
    with pytest.raises(TypeError, match="one op's contract"):
        guard(_op, {"contracts": {}})
