"""Every verdict path of ``run_case``, in-process (no worker processes), plus Result round trips.

The fault targets compute ``x * 2`` (exact) except for their one injected fault, so each test
knows the right answer independently of the code under test. Faults that kill or poison a
process (segfault, exit, sticky, hang) are only run in workers: see test_fault_isolation.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings

from harness.cases import Case
from harness.layouts import LayoutSpec, ViewOp
from harness.reference.metrics import Bound
from harness.runner.execute import device_healthy, is_oom, run_case
from harness.runner.targets import BaseTarget, TargetError, get_target, register_target, resolve_target
from harness.strategies import layouts
from harness.values import ValueSpec
from harness.verdicts import BENIGN, Result, Verdict

from helpers import PLAIN, case

#: misaligned offset, padding on the last dim: the storage around the view holds poison
ODD = LayoutSpec((4, 8), "float32", offset=3, pad=(0, 2))


@pytest.mark.parametrize("spec", [PLAIN, ODD], ids=["plain", "offset+pad"])
def test_exact_op_passes_in_any_layout(spec):
    r = run_case(case("cpu.scale", spec))
    assert r.verdict is Verdict.PASS, r.format()
    assert r.metrics["max_abs"] == 0.0
    assert r.bound["why"]


@settings(max_examples=25, deadline=None)
@given(spec=layouts((3, 5), "float32", broadcast=True, views=True))
def test_exact_op_passes_for_every_generated_layout(spec):
    # x * 2 is exact and elementwise: any layout must pass bitwise, including the layout check
    r = run_case(case("cpu.scale", spec))
    assert r.verdict is Verdict.PASS, r.format()


def test_matmul_passes_with_its_derived_bound_across_layouts():
    a = LayoutSpec((5, 7), "float32", offset=1)
    b = LayoutSpec((7, 3), "float32", perm=(1, 0), pad=(1, 0))
    r = run_case(Case(op="cpu.matmul", layouts={"a": a, "b": b}))
    assert r.verdict is Verdict.PASS, r.format()
    # the bound is 2 x the naive run's error + a rounding floor: never zero, never typed in
    assert r.bound["k"] == 2.0 and r.bound["floor"] > 0
    assert r.metrics["err"] <= r.metrics["allowed"]
    assert "layout_err" in r.metrics  # b is not contiguous: the layout check ran


@pytest.mark.parametrize("spec", [PLAIN, LayoutSpec((4, 8), "float32", perm=(1, 0))], ids=["plain", "column-major"])
def test_nan_output_is_nonfinite(spec):
    r = run_case(case("fault.nan", spec))
    assert r.verdict is Verdict.NONFINITE, r.format()
    assert r.metrics["nonfinite"] == 1 and "[0, 0]" in r.message


def test_drift_reports_numbers_against_the_bound():
    r = run_case(case("fault.drift", rel=1e-2))
    assert r.verdict is Verdict.DRIFT
    x = ValueSpec("normal", seed=1).generate((4, 8), torch.float32)
    expected = float((x * 2 * 1e-2).abs().max())  # |2x(1+rel) - 2x|, computed independently
    assert math.isclose(r.metrics["max_abs"], expected, rel_tol=1e-5)
    assert r.bound["allowed"] == 0.0 and r.metrics["ratio"] == math.inf
    assert "x" in r.layouts


@pytest.mark.parametrize("spec", [PLAIN, ODD], ids=["plain", "offset+pad"])
def test_writing_into_the_input_is_input_mutation(spec):
    r = run_case(case("fault.mutate", spec))
    assert r.verdict is Verdict.INPUT_MUTATION
    assert "x: 1 of its 32 values changed (first at index [0, 0])" in r.message
    assert r.mutated_inputs == ["x"] and r.poison_written == []  # the record: a value inside the view only


def test_writing_into_the_poison_is_input_mutation():
    r = run_case(case("fault.poison_write", ODD))
    assert r.verdict is Verdict.INPUT_MUTATION
    assert "outside the view" in r.message
    assert r.mutated_inputs == ["x"] and r.poison_written == ["x"]


def test_poison_write_without_poison_passes():
    # a plain layout has no storage outside the view, so there is nothing to write into
    assert run_case(case("fault.poison_write", PLAIN)).verdict is Verdict.PASS


#: small integers: x * 2 and x * 2 + eps are exact in float32, so differences are known exactly
INTS = {"x": torch.arange(32, dtype=torch.float32).reshape(4, 8)}


def test_layout_dependent_result_is_layout_noninvariance():
    r = run_case(case("fault.layout", ODD), values=INTS)
    assert r.verdict is Verdict.LAYOUT_NONINVARIANCE
    assert r.metrics["layout_max_abs"] == 1.0  # the fault adds exactly 1 at a non-zero offset
    assert run_case(case("fault.layout", PLAIN)).verdict is Verdict.PASS


def test_clean_refusal_is_rejected_and_the_device_stays_healthy():
    r = run_case(case("fault.reject", ODD))
    assert r.verdict is Verdict.REJECTED
    assert "must be contiguous" in r.message and "ValueError" in r.message
    assert device_healthy("cpu") == (True, "")


def test_out_of_memory_error_is_oom():
    r = run_case(case("fault.oom"))
    assert r.verdict is Verdict.OOM
    assert "OutOfMemoryError" in r.message


def test_real_allocator_refusal_is_oom():
    r = run_case(case("fault.oom", real=True))  # a 1 PiB request: refused at once, nothing touched
    assert r.verdict is Verdict.OOM, r.format()
    assert "can't allocate memory" in r.message


def test_failing_reference_is_error_not_the_kernels_verdict():
    r = run_case(case("fault.reference_error"))
    assert r.verdict is Verdict.ERROR
    assert "reference failed (not the op under test)" in r.message


def test_unknown_target_is_unavailable_and_names_the_known_ones():
    r = run_case(case("no.such.op"))
    assert r.verdict is Verdict.UNAVAILABLE
    assert "no.such.op" in r.message and "cpu.scale" in r.message


def test_cuda_only_target_is_unavailable_on_cpu_with_reason():
    r = run_case(case("fault.device_assert"))
    assert r.verdict is Verdict.UNAVAILABLE
    assert "needs a CUDA device" in r.message


def test_stored_values_override_the_recipe_and_are_not_modified():
    vals = {"x": torch.arange(32, dtype=torch.float32).reshape(4, 8)}
    before = vals["x"].clone()
    r = run_case(case("fault.mutate", ODD), values=vals)  # the op mutates *its* input, not ours
    assert r.verdict is Verdict.INPUT_MUTATION
    assert torch.equal(vals["x"], before)
    r = run_case(case("fault.drift", rel=0.5), values=vals)
    assert r.metrics["max_abs"] == 31.0  # |2*31*1.5 - 2*31|: the stored values were used


def test_wrong_output_shape_is_drift_with_both_shapes():
    @register_target(replace=True)
    class _Transposed(BaseTarget):
        name = "test.transposed_output"

        def run(self, inputs, params):
            return inputs["x"].t() * 2

        def reference(self, inputs, params):
            return inputs["x"].double() * 2, None

    r = run_case(case("test.transposed_output"))
    assert r.verdict is Verdict.DRIFT
    assert "(8, 4)" in r.message and "(4, 8)" in r.message


def test_layout_bound_allows_reordering_but_not_more():
    @register_target(replace=True)
    class _Wobbly(BaseTarget):
        """Adds eps * (storage offset != 0): allowed iff eps is within the declared layout bound."""

        name = "test.wobbly"

        def run(self, inputs, params):
            x = inputs["x"]
            return x * 2 + (params["eps"] if x.storage_offset() else 0.0)

        def reference(self, inputs, params):
            x = inputs["x"]
            return x.double() * 2, x * 2 + 0.25

        def bound(self, inputs, params, exact):
            return Bound(k=1.0, floor=0.0, why="test: as far off as the emulation")

        def layout_bound(self, inputs, params, exact):
            return Bound(k=1.0, floor=0.0, why="test: layouts may differ by the emulation's error")

    assert run_case(case("test.wobbly", ODD, eps=0.125), values=INTS).verdict is Verdict.PASS
    r = run_case(case("test.wobbly", ODD, eps=0.5), values=INTS)
    assert r.verdict is Verdict.LAYOUT_NONINVARIANCE
    assert r.metrics["layout_err"] == 0.5 and r.metrics["layout_allowed"] == 0.25


def test_allowed_mutation_still_protects_the_poison():
    @register_target(replace=True)
    class _InPlace(BaseTarget):
        name = "test.inplace"
        mutates = ("x",)

        def run(self, inputs, params):
            return inputs["x"].mul_(2)

        def reference(self, inputs, params):
            return inputs["x"].double() * 2, None

    assert run_case(case("test.inplace", ODD)).verdict is Verdict.PASS


@pytest.mark.parametrize("allowed", [(), ("b",)], ids=["not allowed", "allowed"])
def test_the_mutation_record_names_each_input_and_whether_its_poison_changed(allowed):
    @register_target(replace=True)
    class _Sloppy(BaseTarget):
        """Scales b in place, then writes the element just before b's view (its poison)."""

        name = "test.sloppy"
        mutates = allowed

        def run(self, inputs, params):
            a, b = inputs["a"], inputs["b"]
            b.mul_(2)
            flat = b.new_empty(0).set_(b.untyped_storage(), 0, (b.untyped_storage().nbytes() // 4,), (1,))
            flat[b.storage_offset() - 1] = 7.0
            return a + b

        def reference(self, inputs, params):
            return inputs["a"].double() + 2 * inputs["b"].double(), None

    c = Case(op="test.sloppy", layouts={"a": PLAIN, "b": LayoutSpec((4, 8), "float32", offset=2)})
    r = run_case(c)
    assert r.verdict is Verdict.INPUT_MUTATION, r.message
    assert r.mutated_inputs == ["b"] and r.poison_written == ["b"]  # a untouched; b's values and its poison
    back = Result.from_json(json.loads(json.dumps(r.to_json())))
    assert (back.mutated_inputs, back.poison_written) == (["b"], ["b"])


def test_registry_errors_name_the_problem():
    with pytest.raises(TargetError, match="unknown target 'nope'"):
        get_target("nope")
    with pytest.raises(TargetError, match="already registered"):

        class _Dup(BaseTarget):
            name = "cpu.scale"

        register_target(_Dup)
    with pytest.raises(TargetError, match="missing"):
        register_target(object())
    assert resolve_target(Case(op="cpu", backend="scale", layouts={"x": PLAIN})).name == "cpu.scale"


def test_result_json_round_trip_keeps_nonfinite_numbers():
    r = run_case(case("fault.drift"))
    text = json.dumps(r.to_json())  # must be plain JSON
    back = Result.from_json(json.loads(text))
    assert back.verdict is Verdict.DRIFT and back.metrics["ratio"] == math.inf
    assert back.summary() == r.summary()
    with pytest.raises(ValueError, match="unknown Result fields"):
        Result.from_json({**r.to_json(), "bogus": 1})


def test_a_result_written_before_the_mutation_record_still_loads():
    old = {
        "verdict": "input_mutation",
        "message": "the op wrote into its inputs: k: 3 of its 8 values changed",
        "op": "attn.x",
    }
    r = Result.from_json(old)
    assert r.verdict is Verdict.INPUT_MUTATION and r.mutated_inputs == [] and r.poison_written == []


def test_verdict_parse_names_valid_choices():
    assert Verdict.parse(" Device_Fault ") is Verdict.DEVICE_FAULT
    with pytest.raises(ValueError, match="expected one of: pass, rejected"):
        Verdict.parse("crashed")
    assert Verdict.REJECTED in BENIGN and not Verdict.UNAVAILABLE.failed and Verdict.TIMEOUT.kills_worker


def test_oom_classification():
    assert is_oom(torch.OutOfMemoryError("x"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))
    assert not is_oom(RuntimeError("shape mismatch"))


def test_view_op_layouts_are_described_in_results():
    spec = LayoutSpec((8, 4), "float32", base_shape=(4, 8), views=(ViewOp.transpose(0, 1),))
    r = run_case(case("fault.nan", spec))
    assert "transpose" in r.layouts["x"]
    assert r.format().count("layout x:") == 1


def test_fault_recorder_names_the_op_that_raised_or_the_triton_launch_before_it():
    from harness.runner.execute import OpRecorder

    rec = OpRecorder()
    x = torch.ones(3)
    with pytest.raises(RuntimeError):
        with rec:
            y = x * 2
            torch.ones(2) @ y  # shape error raised inside aten::mm / aten::dot
    assert rec.tail[0] == "aten::mul.Tensor" and rec.failed == rec.tail[-1] != "aten::mul.Tensor"
    assert rec.culprit() == (rec.failed, "")
    # Triton launches do not pass the dispatcher: the launch hook records them by kernel name
    rec2 = OpRecorder()
    rec2.tail.extend(["aten::mul.Tensor"])
    rec2._triton_launch({"name": "_fwd_kernel"})
    assert rec2.culprit() == ("triton::_fwd_kernel", "raised outside torch's dispatcher; last launch named")
    rec2.tail.append("aten::add.Tensor")
    rec2.failed = "aten::add.Tensor"  # Triton does not check launches: the error surfaces at the next op
    op, note = rec2.culprit()
    assert op == "aten::add.Tensor" and "triton::_fwd_kernel" in note and "likely culprit" in note


def test_nan_in_an_fp8_output_is_counted_where_the_reference_is_finite():
    """``torch.isfinite`` does not take the FP8 dtypes: an op that returns E4M3 must still be judged."""
    from harness.runner.execute import _nonfinite_where_ref_finite

    out = torch.tensor([1.0, float("nan"), 2.0, float("nan")]).to(torch.float8_e4m3fn)
    exact = torch.tensor([1.0, 1.0, 2.0, float("nan")], dtype=torch.float64)
    assert _nonfinite_where_ref_finite(out, exact) == (1, [1])
