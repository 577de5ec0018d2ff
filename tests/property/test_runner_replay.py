"""``harness replay`` exit codes (0 pass / 1 fail / 2 harness-side / 125 cannot run; 128 under --bisect) and
``harness minimize``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.cases import Case, load_case, save_case
from harness.cli import main as cli_main
from harness.layouts import LayoutSpec, ViewOp
from harness.reference.metrics import Bound
from harness.runner.execute import run_case
from harness.runner.minimize import candidates, minimize
from harness.cases import CaseError, case_elements
from harness.runner.minimize import NothingToMinimize
from harness.runner.replay import EXIT_BISECT_ABORT, EXIT_CANNOT_RUN, EXIT_FAIL, EXIT_HARNESS, EXIT_PASS, exit_code
from harness.runner.targets import BaseTarget, register_target
from harness.values import ValueSpec
from harness.verdicts import Result, Verdict

REPO = Path(__file__).resolve().parents[2]
PLAIN = LayoutSpec((4, 8), "float32")


def write(tmp_path: Path, op: str, name: str, spec: LayoutSpec = PLAIN, **env) -> Path:
    c = Case(op=op, layouts={"x": spec}, values={"x": ValueSpec("normal", seed=2)}, env=env or {"device_type": "cpu"})
    return save_case(c, tmp_path / f"{name}.json")


@pytest.mark.parametrize(
    ("op", "argv", "code"),
    [
        ("cpu.scale", [], EXIT_PASS),
        ("fault.nan", [], EXIT_FAIL),
        ("fault.nan", ["--expect", "nonfinite"], EXIT_PASS),
        ("fault.nan", ["--expect", "pass"], EXIT_FAIL),
        ("no.such.target", [], EXIT_CANNOT_RUN),  # e.g. a commit from before the target existed
    ],
)
def test_replay_exit_codes(tmp_path, capsys, op, argv, code):
    path = write(tmp_path, op, "c")
    assert cli_main(["replay", str(path), *argv]) == code
    out = capsys.readouterr().out
    assert op in out


def test_replay_of_a_cuda_case_without_gpu_cannot_run(tmp_path, capsys):
    path = write(tmp_path, "cpu.scale", "gpu_case", device_type="cuda", device="cuda:0", device_name="NVIDIA H100")
    assert cli_main(["replay", str(path)]) == EXIT_CANNOT_RUN
    assert "recorded on CUDA (NVIDIA H100)" in capsys.readouterr().err
    # asking for the CPU explicitly runs it anyway
    assert cli_main(["replay", str(path), "--device", "cpu"]) == EXIT_PASS


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ('{"schema_version": 0, "op": "cpu.scale"}', "schema_version 0 is not supported"),
        ('{"schema_version": true, "op": "cpu.scale"}', "schema_version must be an integer"),
        ('{"schema_version": 1, "op": "cpu.scale", "layouts": {"x": {"shape": [4], "dtype": "qint8"}}}', "'qint8'"),
        (
            '{"schema_version": 1, "op": "cpu.scale", "layouts": {"x": {"shape": [4], "offset": 500000000}}, '
            '"values": {"x": {}}}',
            "over the budget",
        ),
    ],
)
def test_replay_of_a_bad_case_file_is_harness_side_never_fail_or_skip(tmp_path, capsys, payload, match):
    bad = tmp_path / "bad.json"
    bad.write_text(payload)
    assert cli_main(["replay", str(bad)]) == EXIT_HARNESS
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
    assert cli_main(["replay", str(bad), "--bisect"]) == EXIT_BISECT_ABORT
    assert "git bisect run stops here" in capsys.readouterr().err
    assert cli_main(["replay", str(tmp_path / "typo.json")]) == EXIT_HARNESS  # a typo is not "skip this commit"


def test_replay_of_a_newer_schema_cannot_run_at_this_commit(tmp_path, capsys):
    bad = tmp_path / "new.json"
    bad.write_text('{"schema_version": 99, "op": "cpu.scale"}')
    assert cli_main(["replay", str(bad), "--bisect"]) == EXIT_CANNOT_RUN
    assert "written by a newer harness" in capsys.readouterr().err


def test_replay_bad_arguments_abort_a_bisect(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, "cpu.scale", "c")
    assert cli_main(["replay", str(path), "--expect", "crashed", "--bisect"]) == EXIT_BISECT_ABORT
    monkeypatch.setattr(sys, "argv", ["harness", "replay", str(path), "--bisect", "--timeout", "soon"])
    with pytest.raises(SystemExit) as e:
        cli_main(sys.argv[1:])
    assert e.value.code == EXIT_BISECT_ABORT and "--timeout" in capsys.readouterr().err


def test_replay_rejects_unknown_expect(tmp_path, capsys):
    path = write(tmp_path, "cpu.scale", "c")
    assert cli_main(["replay", str(path), "--expect", "crashed"]) == EXIT_HARNESS
    assert "expected one of" in capsys.readouterr().err


def test_replay_exit_code_rules():
    r = Result(Verdict.UNAVAILABLE, "needs compute capability >= 8.9, found 8.6")
    assert exit_code(r, None) == EXIT_CANNOT_RUN
    assert exit_code(r, Verdict.UNAVAILABLE) == EXIT_PASS
    broken = Result(Verdict.WORKER_CRASH, "fresh process exited with status 1", attribution={"harness_broken": True})
    assert exit_code(broken, None) == EXIT_CANNOT_RUN
    assert exit_code(Result(Verdict.WORKER_CRASH), None) == EXIT_FAIL
    # the harness's own verdicts are never "still fails"
    harness_verdicts = [Verdict.ERROR] + [v for v in Verdict if v.value == "unsupported"]
    for v in harness_verdicts:
        assert exit_code(Result(v, "the reference raised"), None) == EXIT_HARNESS
        assert exit_code(Result(v), Verdict.DRIFT) == EXIT_HARNESS
        assert exit_code(Result(v), None, bisect=True) == EXIT_BISECT_ABORT
        assert exit_code(Result(v), v) == EXIT_PASS  # asked for on purpose
    assert exit_code(Result(Verdict.DRIFT), None, bisect=True) == EXIT_FAIL


def test_replay_works_as_git_bisect_run_command(tmp_path):
    # the real entry point, as `git bisect run python -m harness replay CASE` calls it
    path = write(tmp_path, "fault.drift", "drift")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cp = subprocess.run(
        [sys.executable, "-m", "harness", "replay", str(path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert cp.returncode == EXIT_FAIL, cp.stdout + cp.stderr
    assert "[drift] fault.drift" in cp.stdout and "recorded verdict" not in cp.stdout


# ------------------------------------------------------------------------------ minimize


def run_in_process(c: Case, v: dict) -> Result:
    return run_case(c, "cpu", values=v or None)


def test_minimize_reaches_the_known_minimal_layout():
    # fault.layout fails iff the storage offset is non-zero: everything else must go
    spec = LayoutSpec(
        (10, 6),
        "float32",
        base_shape=(6, 10),
        views=(ViewOp.transpose(0, 1),),
        offset=3,
        pad=(0, 2),
        step=(1, 2),
        perm=(1, 0),
    )
    c = Case(op="fault.layout", layouts={"x": spec}, values={"x": ValueSpec("outliers", seed=3)})
    res = minimize(c, {}, run_in_process)
    assert res.verdict is Verdict.LAYOUT_NONINVARIANCE
    assert res.case.layouts == {"x": LayoutSpec((1, 1), "float32", offset=3)}
    assert res.case.values == {"x": ValueSpec("normal", seed=3)}
    assert res.removed[0] == "x: view ops" and "x: values outliers -> normal" in res.removed


@register_target(replace=True)
class _PaddedB(BaseTarget):
    """Result depends on b's padding when K >= 2 (layout non-invariance): the minimal case keeps the padding, K = 2."""

    name = "test.padded_b"

    def run(self, inputs, params):
        a, b = inputs["a"], inputs["b"]
        bad = b.untyped_storage().nbytes() > b.numel() * b.element_size() and a.shape[-1] >= 2
        return a @ b + (1.0 if bad else 0.0)

    def reference(self, inputs, params):
        return inputs["a"].double() @ inputs["b"].double(), inputs["a"] @ inputs["b"]

    def bound(self, inputs, params, exact):
        return Bound.derived(2.0, exact, "float32", why="test: 2 x the same-precision run")

    def layout_bound(self, inputs, params, exact):
        return self.bound(inputs, params, exact)


def test_minimize_shrinks_shared_dims_together_and_keeps_what_matters():
    a = LayoutSpec((6, 8), "float32", offset=5)
    b = LayoutSpec((8, 5), "float32", pad=(0, 3))
    c = Case(op="test.padded_b", layouts={"a": a, "b": b})
    res = minimize(c, {}, run_in_process)
    assert res.verdict is Verdict.LAYOUT_NONINVARIANCE
    # K (8) can only shrink in both operands at once; the op rejects a mismatch
    assert res.case.layouts["a"] == LayoutSpec((1, 2), "float32")
    assert res.case.layouts["b"] == LayoutSpec((2, 1), "float32", pad=(0, 3))
    assert "size 8 -> 4 in ['a', 'b']" in res.removed


def test_minimize_slices_stored_values_with_the_dims():
    c = Case(op="fault.layout", layouts={"x": LayoutSpec((4, 4), "float32", offset=1)})
    vals = {"x": torch.arange(16, dtype=torch.float32).reshape(4, 4)}
    shrunk = {what: v for what, _, v in candidates(c, vals)}
    assert torch.equal(shrunk["x: dim 0 4 -> 2"]["x"], vals["x"][:2])
    assert "x" not in shrunk["x: stored values -> recipe normal"]
    assert torch.equal(vals["x"], torch.arange(16, dtype=torch.float32).reshape(4, 4))  # not modified


def test_minimize_refuses_a_passing_case():
    c = Case(op="cpu.scale", layouts={"x": PLAIN})
    with pytest.raises(NothingToMinimize, match="does not fail here"):
        minimize(c, {}, run_in_process)


def test_minimize_refuses_a_harness_verdict():
    with pytest.raises(NothingToMinimize, match="the harness cannot run it"):
        minimize(Case(op="cpu.scale", layouts={"x": PLAIN}), {}, lambda c, v: Result(Verdict.ERROR, "reference raised"))


def test_minimize_checks_the_budget_before_anything_runs():
    ran: list[Case] = []

    def oom(c, v):
        ran.append(c)
        return Result(Verdict.OOM, "out of memory")

    huge = Case(op="cpu.scale", layouts={"x": LayoutSpec((10**12,), "float32")})
    with pytest.raises(CaseError, match="over the budget"):
        minimize(huge, {}, oom)
    assert ran == []
    # removing a broadcast makes the storage grow (4160 -> 8192 elements): over a budget of 5000 that candidate,
    # the first one tried, is skipped unrun; once the dims have shrunk it fits and goes
    c = Case(op="cpu.scale", layouts={"x": LayoutSpec((64, 64), "float32", broadcast=(0,))})
    res = minimize(c, {}, oom, max_elements=5000)
    assert res.removed[:2] == ["size 64 -> 32 in ['x']", "x: broadcast"]
    assert max(case_elements(x) for x in ran) <= 5000


def test_minimize_cli_writes_the_minimal_case(tmp_path, capsys):
    spec = LayoutSpec((6, 4), "float32", offset=2, pad=(1, 1), perm=(1, 0))
    src = write(tmp_path, "fault.layout", "big", spec)
    out = tmp_path / "small.json"
    assert cli_main(["minimize", str(src), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "verdict kept: layout_noninvariance" in text and "permuted memory order" in text
    small, _ = load_case(out)
    assert small.layouts["x"] == LayoutSpec((1, 1), "float32", offset=2)
    assert small.verdict["verdict"] == "layout_noninvariance"
    assert cli_main(["replay", str(out), "--expect", "layout_noninvariance"]) == EXIT_PASS


def test_minimize_out_directory_and_existing_files(tmp_path, capsys):
    spec = LayoutSpec((6, 4), "float32", offset=2, pad=(1, 1))
    src = write(tmp_path, "fault.layout", "big", spec)
    outdir = tmp_path / "minimal"
    outdir.mkdir()
    assert cli_main(["minimize", str(src), "--out", str(outdir)]) == 0
    assert load_case(outdir / "big-min.json")[0].verdict["verdict"] == "layout_noninvariance"
    capsys.readouterr()
    before = (outdir / "big-min.json").read_bytes()
    assert cli_main(["minimize", str(src), "--out", str(outdir)]) == EXIT_HARNESS  # nothing the user owns is lost
    err = capsys.readouterr().err
    assert "big-min.json already exists; pass --force" in err and len(err.strip().splitlines()) == 1
    assert (outdir / "big-min.json").read_bytes() == before
    assert cli_main(["minimize", str(src), "--out", str(outdir / "big-min.json"), "--force"]) == 0
    capsys.readouterr()
    assert cli_main(["minimize", str(src), "--out", str(outdir / "big-min.json" / "x.json")]) == EXIT_HARNESS
    assert "big-min.json is a file, not a directory" in capsys.readouterr().err


def test_minimize_bad_files_exit_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "q.json"
    bad.write_text(
        '{"schema_version": 1, "op": "cpu.scale", "layouts": {"x": {"shape": [4], "dtype": "qint8"}},'
        ' "values": {"x": {}}}'
    )
    assert cli_main(["minimize", str(bad)]) == EXIT_HARNESS
    err = capsys.readouterr().err
    assert "'qint8' is not a supported dtype" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["minimize", str(tmp_path)]) == EXIT_HARNESS
    assert "is a directory, not a case file" in capsys.readouterr().err


def test_git_bisect_run_stops_on_a_harness_side_problem_with_the_message(tmp_path):
    # a throwaway repository: with --bisect, a malformed case stops the bisect instead of marking a commit bad
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    for i in range(3):
        (repo / "kernel.txt").write_text(str(i))
        subprocess.run([*git, "add", "."], cwd=repo, check=True)
        subprocess.run([*git, "commit", "-qm", f"c{i}"], cwd=repo, check=True)
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1, "op": "cpu.scale", "layouts": {"x": {"shape": [4], "dtype": "qint8"}}}')
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([*git, "bisect", "start", "HEAD", "HEAD~2"], cwd=repo, check=True, capture_output=True)
    cp = subprocess.run(
        [*git, "bisect", "run", sys.executable, "-m", "harness", "replay", "--bisect", str(bad)],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    log = cp.stdout + cp.stderr
    assert cp.returncode != 0 and "'qint8' is not a supported dtype" in log and "git bisect run stops here" in log, log
    assert "is the first bad commit" not in log, log
