"""Verdict ``nondeterministic``: ``run_case`` calls the op a second time on the same, verified inputs and the two
outputs must be bitwise equal; ``harness replay`` of such a case runs it several times in one fresh process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.cases import Case, load_case, save_case
from harness.cli import main as cli_main
from harness.layouts import LayoutSpec
from harness.runner.execute import run_case
from harness.runner.pool import WorkerPool
from harness.runner.replay import (
    EXIT_BISECT_ABORT,
    EXIT_FAIL,
    EXIT_HARNESS,
    EXIT_PASS,
    NONDETERMINISTIC_REPEAT,
    repeat_exit_code,
)
from harness.strategies import layouts, value_specs
from harness.targets.doubles import FlipBitsTarget, ScaleTarget
from harness.targets.protocol import register_target
from harness.values import ValueSpec
from harness.verdicts import Result, Verdict
from helpers import case


def test_flaky_nan_is_nondeterministic_in_process_with_counts():
    r = run_case(case("fault.flaky_nan"))
    assert r.verdict is Verdict.NONDETERMINISTIC, r.format()
    assert r.metrics == {"differing": 1, "numel": 32, "nonfinite_runs": [1, 0]}
    assert "1 of 32 elements differ bitwise" in r.message and "run 1: 1 NaN/inf, run 2: 0 NaN/inf" in r.message
    assert Verdict.NONDETERMINISTIC.failed and not Verdict.NONDETERMINISTIC.kills_worker


def test_nan_at_the_same_place_in_both_runs_is_not_nondeterministic():
    # fault.nan puts its NaN at index 0 on every call: nonfinite, judged after the (passed) determinism check
    assert run_case(case("fault.nan")).verdict is Verdict.NONFINITE


@settings(max_examples=200, deadline=None)
@given(
    spec=st.sampled_from([(3, 5), (2, 4, 6), (1, 7)]).flatmap(
        lambda shape: st.tuples(
            layouts(shape, "float32", broadcast=True, views=True),
            layouts((shape[-1], 3), "float32"),
        )
    ),
    values=value_specs(allow_nonfinite=True),
)
def test_a_deterministic_matmul_is_never_nondeterministic(spec, values):
    a, b = spec
    c = Case(op="cpu.matmul", layouts={"a": a, "b": b}, values={"a": values, "b": ValueSpec("normal", seed=3)})
    r = run_case(c)
    assert r.verdict is not Verdict.NONDETERMINISTIC, r.format()
    assert r.verdict in (Verdict.PASS, Verdict.NONFINITE, Verdict.DRIFT, Verdict.LAYOUT_NONINVARIANCE), r.format()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_scale_with_nan_and_inf_inputs_is_never_nondeterministic(dtype):
    for seed in range(25):
        c = Case(op="cpu.scale", layouts={"x": LayoutSpec((5, 6), dtype)}, values={"x": ValueSpec("nonfinite", seed)})
        r = run_case(c)
        assert r.verdict is Verdict.PASS, r.format()  # the reference has the same NaN/inf: pass, bitwise


def test_the_opt_out_double_passes_and_would_be_flagged_without_it():
    for seed in range(6):
        r = run_case(case("fault.flip_bits_opted_out", seed=seed))
        assert r.verdict is Verdict.PASS, r.format()

    class OptedIn(FlipBitsTarget):
        name = "test.flip_bits_opted_in"
        deterministic = True

    register_target(OptedIn)
    r = run_case(case(OptedIn.name))
    assert r.verdict is Verdict.NONDETERMINISTIC, r.format()
    assert r.metrics["differing"] == 1 and r.metrics["nonfinite_runs"] == [0, 0]
    assert "NaN/inf" not in r.message  # both runs finite: nothing to say about them


class _Counting(ScaleTarget):
    """``x * 2``; what it does on its second call is up to the subclass (``second``)."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self, inputs, params):
        self.calls += 1
        if self.calls % 2 == 0:
            return self.second(inputs)
        return super().run(inputs, params)

    def second(self, inputs):
        return inputs["x"] * 2


class _RaisesSecond(_Counting):
    name = "test.raises_second"

    def second(self, inputs):
        raise ValueError("refused the second time")


class _OomSecond(_Counting):
    name = "test.oom_second"

    def second(self, inputs):
        raise torch.OutOfMemoryError("Tried to allocate 1 TiB (test)")


class _MutatesSecond(_Counting):
    name = "test.mutates_second"

    def second(self, inputs):
        out = inputs["x"] * 2
        inputs["x"].reshape(-1)[0] += 1
        return out


class _SameBuffer(ScaleTarget):
    """Hands back one buffer it keeps (refilled each call); NaN in it on every other call."""

    name = "test.same_buffer"

    def __init__(self) -> None:
        self.calls = 0
        self.buf: torch.Tensor | None = None

    def run(self, inputs, params):
        self.calls += 1
        x = inputs["x"]
        if self.buf is None:
            self.buf = torch.empty_like(x, memory_format=torch.contiguous_format)
        torch.mul(x, 2, out=self.buf)
        if self.calls % 2:
            self.buf.view(-1)[0] = float("nan")
        return self.buf


class _SameBufferSteady(_SameBuffer):
    name = "test.same_buffer_steady"

    def run(self, inputs, params):
        self.calls = 1  # always an even call: never the NaN one
        return super().run(inputs, params)


class _WritesOut(ScaleTarget):
    """Writes ``x * 2`` into its declared ``out`` input and returns it; ``flaky``: NaN on every other call."""

    name = "test.writes_out"
    mutates = ("out",)
    flaky = False

    def __init__(self) -> None:
        self.calls = 0

    def run(self, inputs, params):
        self.calls += 1
        out = inputs["out"]
        torch.mul(inputs["x"], 2, out=out)
        if self.flaky and self.calls % 2:
            out.view(-1)[0] = float("nan")
        return out


class _WritesOutFlaky(_WritesOut):
    name = "test.writes_out_flaky"
    flaky = True


def _out_case(op: str) -> Case:
    spec = LayoutSpec((4, 8), "float32")
    return Case(op=op, layouts={"x": spec, "out": spec}, values={"x": ValueSpec("normal", seed=1)})


def test_the_second_call_is_judged_like_the_first():
    for cls in (_RaisesSecond, _OomSecond, _MutatesSecond):
        register_target(cls)
    r = run_case(case(_RaisesSecond.name))
    # the op took these inputs once: refusing them the second time is not a clean refusal
    assert r.verdict is Verdict.NONDETERMINISTIC, r.format()
    assert "second, identical call" in r.message and "refused the second time" in r.message
    r = run_case(case(_OomSecond.name))
    assert r.verdict is Verdict.OOM and "second, identical call" in r.message, r.format()
    r = run_case(case(_MutatesSecond.name))
    assert r.verdict is Verdict.INPUT_MUTATION and r.mutated_inputs == ["x"], r.format()
    assert "written by the second, identical call" in r.message


def test_an_output_the_second_call_overwrites_is_still_compared():
    for cls in (_SameBuffer, _SameBufferSteady, _WritesOut, _WritesOutFlaky):
        register_target(cls)
    r = run_case(case(_SameBuffer.name))
    assert r.verdict is Verdict.NONDETERMINISTIC, r.format()
    assert run_case(case(_SameBufferSteady.name)).verdict is Verdict.PASS
    r = run_case(_out_case(_WritesOutFlaky.name))
    assert r.verdict is Verdict.NONDETERMINISTIC and r.metrics["nonfinite_runs"] == [1, 0], r.format()
    assert run_case(_out_case(_WritesOut.name)).verdict is Verdict.PASS


def test_flaky_nan_through_a_cpu_pool_then_replay_counts_six_runs(tmp_path, capsys):
    cases_dir = tmp_path / "cases"
    with WorkerPool("cpu", 1, spares=0, case_timeout=60, cases_dir=cases_dir, attribute=False) as p:
        # NaN on call 1, 7, 13, ...: the worker's first case (calls 1 and 2) sees it
        r = p.run_one(case("fault.flaky_nan", every=6))
        clean = p.run_one(case("cpu.scale"))
    assert r.verdict is Verdict.NONDETERMINISTIC, r.format()
    assert r.metrics["nonfinite_runs"] == [1, 0] and clean.verdict is Verdict.PASS
    path = Path(r.case_path)
    assert load_case(path)[0].verdict["verdict"] == "nondeterministic"

    # replay: 6 runs in one fresh process, calls 1-2, 3-4, ...: runs 1 and 4 see the NaN
    assert cli_main(["replay", str(path)]) == EXIT_FAIL
    out = capsys.readouterr().out
    assert "runs in one fresh process: nondeterministic 2/6, pass 4/6" in out, out
    assert cli_main(["replay", str(path), "--expect", "nondeterministic"]) == EXIT_PASS
    capsys.readouterr()
    assert cli_main(["replay", str(path), "--repeat", "3", "--json"]) == EXIT_FAIL
    data = json.loads(capsys.readouterr().out)
    assert [x["verdict"] for x in data["runs"]] == ["nondeterministic", "pass", "pass"]
    assert data["counts"] == "nondeterministic 1/3, pass 2/3"


def test_replay_runs_once_unless_the_case_is_nondeterministic_or_repeat_is_given(tmp_path, capsys):
    c = Case(
        op="cpu.scale",
        layouts={"x": LayoutSpec((4, 8), "float32")},
        values={"x": ValueSpec("normal", seed=1)},
        env={"device_type": "cpu"},
    )
    path = save_case(c, tmp_path / "c.json")
    assert cli_main(["replay", str(path)]) == EXIT_PASS
    assert "runs in one fresh process" not in capsys.readouterr().out
    assert cli_main(["replay", str(path), "--repeat", "3"]) == EXIT_PASS
    assert "runs in one fresh process: pass 3/3" in capsys.readouterr().out
    assert NONDETERMINISTIC_REPEAT == 6


@pytest.mark.parametrize("value", ["0", "-2", "abc", "1.5"])
@pytest.mark.parametrize("bisect", [False, True])
def test_bad_repeat_is_one_line_exit_2(tmp_path, capsys, value, bisect):
    path = save_case(case("cpu.scale"), tmp_path / "c.json")
    argv = ["replay", str(path), "--repeat", value] + (["--bisect"] if bisect else [])
    assert cli_main(argv) == (EXIT_BISECT_ABORT if bisect else EXIT_HARNESS)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and f"--repeat {value!r}: give a whole number of runs >= 1" in lines[0], captured.err
    assert captured.out == ""


def _r(v: Verdict) -> Result:
    return Result(v, op="x")


def test_exit_code_of_repeated_runs():
    P, N = Verdict.PASS, Verdict.NONDETERMINISTIC
    assert repeat_exit_code([_r(P)] * 6, None) == EXIT_PASS
    assert repeat_exit_code([_r(N)] + [_r(P)] * 5, None) == EXIT_FAIL
    assert repeat_exit_code([_r(P), _r(Verdict.ERROR)], None) == EXIT_HARNESS
    assert repeat_exit_code([_r(P), _r(Verdict.ERROR)], None, bisect=True) == EXIT_BISECT_ABORT
    assert repeat_exit_code([_r(N), _r(Verdict.ERROR)], None) == EXIT_FAIL  # a failure about the op comes first
    assert repeat_exit_code([_r(N), _r(P)], N) == EXIT_PASS
    assert repeat_exit_code([_r(P), _r(P)], N) == EXIT_FAIL  # the expected verdict never came back
    assert repeat_exit_code([_r(N), _r(Verdict.DRIFT)], N) == EXIT_FAIL


class _NanPayload(ScaleTarget):
    """``x * 2`` with a NaN at index 0 whose payload bits change from call to call (still NaN both times)."""

    name = "test.nan_payload"

    def __init__(self) -> None:
        self.calls = 0

    def run(self, inputs, params):
        self.calls += 1
        out = super().run(inputs, params)
        out.view(-1)[:1].view(torch.int32).fill_(0x7FC00000 | self.calls)
        return out


def test_nan_in_the_same_place_with_other_payload_bits_is_the_same_output():
    register_target(_NanPayload)
    r = run_case(case(_NanPayload.name))
    assert torch.isnan(torch.tensor([0x7FC00002], dtype=torch.int32).view(torch.float32)).all()
    assert r.verdict is Verdict.NONFINITE, r.format()  # judged on, not nondeterministic


class _FlakyFp8(_Counting):
    """An E4M3 output (which ``torch.isfinite`` does not take) with a NaN on every other call."""

    name = "test.flaky_fp8"

    def run(self, inputs, params):
        out = super().run(inputs, params).to(torch.float8_e4m3fn)
        if self.calls % 2:
            out.view(-1)[:1].view(torch.uint8).fill_(0x7F)  # the E4M3 NaN
        return out

    def second(self, inputs):
        return inputs["x"] * 2


def test_an_fp8_output_is_compared_and_its_nan_counted():
    register_target(_FlakyFp8)
    r = run_case(case(_FlakyFp8.name))
    assert r.verdict is Verdict.NONDETERMINISTIC, r.format()
    assert r.metrics == {"differing": 1, "numel": 32, "nonfinite_runs": [1, 0]}


def test_the_attribution_rerun_with_op_recording_checks_too():
    assert run_case(case("fault.flaky_nan"), record_ops=True).verdict is Verdict.NONDETERMINISTIC
    assert run_case(case("cpu.scale"), record_ops=True).verdict is Verdict.PASS
