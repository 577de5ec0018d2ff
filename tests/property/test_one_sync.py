"""The one-sync path (``harness.runner.execute._run_one_sync``): a case whose op calls are queued back to back
and judged on the host after one wait for the device must get the verdict, message and numbers of the per-call
path, which waits after every call.  On CUDA it is the default for small cases; ``HARNESS_ONE_SYNC=1`` runs it on
the CPU, which is how these tests compare the two paths."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import harness.runner.execute as execute
from harness.cases import Case
from harness.layouts import LayoutSpec
from harness.matrix import _build_cells, select_targets
from harness.runner.execute import ONE_SYNC_ELEMENTS, one_sync_fits, run_case
from harness.strategies import layouts, value_specs
from harness.targets import resolve_target
from harness.targets.doubles import ScaleTarget
from harness.values import ValueSpec
from harness.verdicts import Verdict
from helpers import case

#: every field of a Result the two paths must agree on (duration, worker and env describe the run, not the op)
COMPARED = ("verdict", "message", "op", "metrics", "bound", "mutated_inputs", "poison_written", "layouts")

#: the doubles whose verdict does not depend on a device or a process: each path must give the same Result
DOUBLES = (
    "cpu.scale",
    "fault.mutate",
    "fault.poison_write",
    "fault.nan",
    "fault.flaky_nan",
    "fault.flip_bits_opted_out",
    "fault.drift",
    "fault.layout",
    "fault.reject",
    "fault.reference_error",
)  # fault.sticky breaks the process it runs in for good: the GPU tests compare device faults


def _both(c: Case, monkeypatch, device: str = "cpu", **kw):
    """``c``'s Result on the per-call path, then on the one-sync path (a stateful double starts from zero calls
    both times), and how many cases the one-sync path ran."""
    taken = []
    real = execute._run_one_sync

    def spy(*a, **k):
        taken.append(1)
        return real(*a, **k)

    monkeypatch.setattr(execute, "_run_one_sync", spy)
    out = []
    for mode in ("0", "1"):
        target = resolve_target(c)
        if hasattr(target, "calls"):
            monkeypatch.setattr(target, "calls", 0)
        monkeypatch.setenv("HARNESS_ONE_SYNC", mode)
        out.append(run_case(c, device, **kw))
    return out[0], out[1], len(taken)


def _same(a, b) -> None:
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    for f in COMPARED:
        assert da[f] == db[f], f"{f}: per-call {da[f]!r} != one-sync {db[f]!r}"
    if a.attribution is not None or b.attribution is not None:
        assert (a.attribution or {}).get("surfaced_at") == (b.attribution or {}).get("surfaced_at")


@pytest.mark.parametrize("op", DOUBLES)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=layouts((3, 6), "float32", views=True, broadcast=True), values=value_specs(allow_nonfinite=True))
def test_the_one_sync_path_gives_the_per_call_verdicts(op, spec, values, monkeypatch):
    c = Case(op=op, layouts={"x": spec}, values={"x": values})
    per_call, one_sync, taken = _both(c, monkeypatch)
    assert taken == 1  # the one-sync path really ran
    _same(per_call, one_sync)


def test_the_compared_doubles_cover_every_verdict_the_paths_judge(monkeypatch):
    # the comparison above means something only if the doubles reach these verdicts on both paths
    seen = set()
    strided = LayoutSpec((3, 6), "float32", offset=2, pad=(0, 3))
    for op in DOUBLES:
        for spec in (strided, LayoutSpec((3, 6), "float32")):
            a, b, _ = _both(case(op, spec), monkeypatch)
            _same(a, b)
            seen.add(a.verdict)
    assert {
        Verdict.PASS,
        Verdict.INPUT_MUTATION,
        Verdict.NONFINITE,
        Verdict.NONDETERMINISTIC,
        Verdict.DRIFT,
        Verdict.LAYOUT_NONINVARIANCE,
        Verdict.REJECTED,
        Verdict.ERROR,
    } <= seen


def test_a_write_by_the_second_call_only_is_named_so(monkeypatch):
    # writes its input on every second call: the first call leaves it intact, the second writes it
    from harness.targets.doubles import ScaleTarget
    from harness.targets.protocol import register_target, unregister_target

    class WritesOnSecond(ScaleTarget):
        name = "test.writes_on_second"

        def __init__(self):
            self.calls = 0

        def run(self, inputs, params):
            self.calls += 1
            if self.calls == 2:
                inputs["x"][0, 0].add_(1)
            return super().run(inputs, params)

    register_target(WritesOnSecond())
    try:
        a, b, taken = _both(case("test.writes_on_second"), monkeypatch)
    finally:
        unregister_target("test.writes_on_second")
    assert taken == 1
    _same(a, b)
    assert b.verdict is Verdict.INPUT_MUTATION and "written by the second, identical call" in b.message


def _matrix_cases(per_op: int = 2) -> list[Case]:
    """Cases of the matrix's own cells on the CPU: a few layout classes of every op that runs there."""
    got: dict[str, list[Case]] = {}
    for cell in _build_cells(select_targets(["fp8_linear*", "legacy.comfyui", "attn.emu.sage2", "attn.sdpa.math"])):
        if len(got.setdefault(cell.op, [])) < per_op:
            got[cell.op].append(cell.factory.build(len(got[cell.op]), size="small"))
    return [c for cs in got.values() for c in cs]


@pytest.mark.parametrize("c", _matrix_cases(), ids=lambda c: f"{c.op}-{'+'.join(c.layouts)}")
def test_matrix_cases_get_the_same_result_on_both_paths(c, monkeypatch):
    per_call, one_sync, taken = _both(c, monkeypatch)
    assert per_call.verdict is not Verdict.ERROR, per_call.format()
    assert taken == 1
    _same(per_call, one_sync)


def test_attribution_reruns_and_larger_cases_wait_after_every_call(monkeypatch):
    monkeypatch.setenv("HARNESS_ONE_SYNC", "1")
    called = []
    monkeypatch.setattr(execute, "_run_one_sync", lambda *a, **k: called.append(1))
    r = run_case(case("cpu.scale"), "cpu", record_ops=True)  # the rerun that names a faulting op
    assert r.verdict is Verdict.PASS and not called
    small, big = torch.empty(16), torch.empty(ONE_SYNC_ELEMENTS + 1)
    assert one_sync_fits({"x": big}, "cpu") and one_sync_fits({"x": small}, "cpu")  # "1": any size
    monkeypatch.setenv("HARNESS_ONE_SYNC", "0")
    assert not one_sync_fits({"x": small}, "cpu")
    monkeypatch.delenv("HARNESS_ONE_SYNC")
    assert not one_sync_fits({"x": small}, "cpu")  # by default only on CUDA devices, and only small cases
    monkeypatch.setattr(execute, "_is_cuda", lambda device: True)  # as a CUDA device would be judged
    assert one_sync_fits({"x": small, "y": torch.empty(ONE_SYNC_ELEMENTS - 16)}, "cpu")
    assert not one_sync_fits({"x": small, "y": torch.empty(ONE_SYNC_ELEMENTS - 15)}, "cpu")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spec=layouts((4, 5), "float32", views=True, broadcast=True),
    values=value_specs(allow_nonfinite=True),
    op=st.sampled_from(["cpu.matmul"]),
)
def test_a_two_input_op_agrees_on_both_paths(spec, values, op, monkeypatch):
    c = Case(
        op=op,
        layouts={"a": spec, "b": LayoutSpec((5, 3), "float32", offset=1)},
        values={"a": values, "b": ValueSpec("normal", seed=2)},
    )
    a, b, taken = _both(c, monkeypatch)
    assert taken == 1
    _same(a, b)


class _ReferenceWrites(ScaleTarget):
    """Its reference writes its input (a harness bug), and its op raises or returns a non-tensor."""

    name = "test.reference_writes"

    def reference(self, inputs, params):
        exact = super().reference(inputs, params)
        inputs["x"].add_(1)
        return exact

    def run(self, inputs, params):
        if params.get("returns") == "float":
            return 1.0
        raise ValueError("test.reference_writes: refused")


class _ReplacesStorage(ScaleTarget):
    """Gives its input a fresh storage (``set_``): a write to the caller's tensor that no byte comparison of the
    old storage sees."""

    name = "test.replaces_storage"

    def run(self, inputs, params):
        x = inputs["x"]
        out = super().run(inputs, params)
        x.set_(x.detach().clone())
        return out


@pytest.mark.parametrize(
    "op, params",
    [("test.reference_writes", {}), ("test.reference_writes", {"returns": "float"}), ("test.replaces_storage", {})],
)
def test_what_comes_before_the_first_calls_verdict_and_replaced_storage_agree(op, params, monkeypatch):
    from harness.targets.protocol import register_target, unregister_target

    register_target(_ReferenceWrites())
    register_target(_ReplacesStorage())
    try:
        spec = LayoutSpec((3, 6), "float32", offset=2)
        a, b, taken = _both(case(op, spec, **params), monkeypatch)
    finally:
        unregister_target("test.reference_writes")
        unregister_target("test.replaces_storage")
    assert taken == 1
    _same(a, b)
    want = Verdict.ERROR if op == "test.reference_writes" else Verdict.INPUT_MUTATION
    assert b.verdict is want, b.format()
    if want is Verdict.ERROR:
        assert "the reference mutated its inputs" in b.message
