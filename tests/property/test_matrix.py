"""The matrix driver on the CPU: cells, round-robin scheduling, verdict aggregation, reports with
links that resolve, unavailable targets with their reason, and ``--fail-on-new`` exit codes."""

from __future__ import annotations

import json
import subprocess
import time
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from harness.cases import load_case
from harness.matrix import Cell, MatrixError, _build_cells, find_new_failures, is_failure, run_matrix, select_targets
from harness.report import load_summary
from harness.targets.corpus import DEFAULT_CORPUS, load_corpus
from harness.verdicts import POOL_CLOSED, Result, Verdict
from helpers import InProcessPool, empty_corpus

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "verdict,accepts_all,expected",
    [
        ("pass", False, False),
        ("unavailable", False, False),
        ("rejected", False, False),
        ("rejected", True, True),
        ("drift", False, True),
        ("input_mutation", False, True),
        ("layout_noninvariance", False, True),
        ("nondeterministic", False, True),
        ("device_fault", False, True),
        ("error", False, True),
        ("timeout", False, True),
        ("worker_crash", False, True),
        ("nonfinite", False, True),
        ("oom", False, True),
    ],
)
def test_which_verdicts_are_failures(verdict: str, accepts_all: bool, expected: bool) -> None:
    assert is_failure(verdict, accepts_all) is expected


def test_new_failures_are_matched_by_fingerprint() -> None:
    cells = [
        {
            "op": "legacy.comfyui",
            "layout_class": "broadcast",
            "failing": ["layout_noninvariance", "drift"],
            "examples": {"drift": "cases/d.json"},
        },
        {"op": "fp8_linear", "layout_class": "offset_2", "failing": []},
    ]
    new = find_new_failures(cells, {"legacy.comfyui|broadcast|layout_noninvariance"})
    assert new == [
        {
            "op": "legacy.comfyui",
            "layout_class": "broadcast",
            "verdict": "drift",
            "case": "cases/d.json",
            "fingerprint": "legacy.comfyui|broadcast|drift",
        }
    ]


def test_cells_are_interleaved_round_robin_and_filtered() -> None:
    targets = select_targets(["fp8_linear", "raw.scaled_mm"])
    cells = _build_cells(targets)
    assert [c.op for c in cells[:4]] == ["fp8_linear", "raw.scaled_mm"] * 2
    assert {c.key for c in cells} == {(t.name, k) for t in targets for k in t.layout_classes()}
    only = _build_cells(targets, ["offset_*"])
    assert {c.layout_class for c in only} == {"offset_1", "offset_2", "offset_4", "offset_8", "offset_16"}
    with pytest.raises(MatrixError, match="matches no layout class"):
        _build_cells(targets, ["nonsense"])
    with pytest.raises(MatrixError, match="matches no target; known: .*fp8_linear"):
        select_targets(["no_such_op*"])


def test_cell_keeps_the_worst_drift_as_its_example() -> None:
    c = Cell("fp8_linear", "linear", "offset_2")
    for ratio in (1.5, 3.0, 2.0):
        c.add(
            f"case{ratio}",
            Result(Verdict.DRIFT, op="fp8_linear", metrics={"ratio": ratio, "err": ratio, "allowed": 1.0}),
        )
    c.add("case-pass", Result(Verdict.PASS, op="fp8_linear", metrics={"ratio": 0.5}))
    assert c.examples["drift"][0] == "case3.0" and c.worst[0] == 3.0 and c.counts == {"drift": 3, "pass": 1}


def test_run_matrix_covers_every_cell_and_stops_on_its_cap(tmp_path) -> None:
    pools = []

    def factory(*a, **kw):
        pools.append(InProcessPool(*a, **kw))
        return pools[0]

    out = tmp_path / "m"
    s = run_matrix(
        device="cpu",
        time_budget=60,
        ops=["legacy.comfyui", "attn.sdpa.flash"],
        classes=["contiguous", "broadcast", "values_beyond_448", "hnd_contiguous"],
        out=out,
        cases_per_cell=2,
        corpus=empty_corpus(tmp_path),
        progress=None,
        pool_factory=factory,
        explore=False,  # the grid's cells and their cap (test_matrix_explore covers the exploration)
    )
    cells = {(c["op"], c["layout_class"]): c for c in s["cells"]}
    assert set(cells) == {
        ("legacy.comfyui", "contiguous"),
        ("legacy.comfyui", "broadcast"),
        ("legacy.comfyui", "values_beyond_448"),
        ("attn.sdpa.flash", "hnd_contiguous"),
    }
    assert cells[("legacy.comfyui", "contiguous")]["status"] == "pass"
    assert cells[("legacy.comfyui", "contiguous")]["cases"] == 2  # the cap, not the budget, ended it
    assert cells[("legacy.comfyui", "broadcast")]["counts"] == {"layout_noninvariance": 2}
    assert cells[("legacy.comfyui", "values_beyond_448")]["failing"] == ["input_mutation"]
    flash = cells[("attn.sdpa.flash", "hnd_contiguous")]
    assert flash["status"] == "unavailable" and "CUDA" in flash["reason"]
    assert s["unavailable"][0]["op"] == "attn.sdpa.flash"
    # one submission told the driver the target cannot run; no round 2 for it
    assert sum(1 for c in pools[0].cases if c.op == "attn.sdpa.flash") == 1
    assert {f["fingerprint"] for f in s["new_failures"]} == {
        "legacy.comfyui|broadcast|layout_noninvariance",
        "legacy.comfyui|values_beyond_448|input_mutation",
    }
    # every example link resolves to a loadable case of that cell, holding the verdict
    for c in s["cells"]:
        for verdict, rel in c["examples"].items():
            case, tensors = load_case(out / rel)
            assert case.op == c["op"] and case.params["layout_class"] == c["layout_class"]
            assert case.verdict["verdict"] == verdict and tensors
    assert load_summary(out) == s


def test_run_matrix_rejects_bad_arguments(tmp_path) -> None:
    for bad in (0, -1, float("nan")):
        with pytest.raises(MatrixError, match="--time-budget .* must be > 0"):
            run_matrix(device="cpu", time_budget=bad, out=tmp_path, progress=None)
    with pytest.raises(MatrixError, match="--device 'tpu'"):
        run_matrix(device="tpu", ops=["fp8_linear"], out=tmp_path, progress=None)
    with pytest.raises(MatrixError, match="--workers 0"):
        run_matrix(device="cpu", workers=0, out=tmp_path, progress=None)


def test_the_corpus_makes_its_failures_known(tmp_path) -> None:
    s = run_matrix(
        device="cpu",
        cases_per_cell=1,
        ops=["legacy.wanvideo_late2025"],
        classes=["values_beyond_448"],
        out=tmp_path / "m",
        progress=None,
        pool_factory=lambda *a, **k: InProcessPool(["cpu"]),
        explore=False,
    )
    assert s["new_failures"] == []
    assert s["cells"][0]["known"] == ["input_mutation"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness", "matrix", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_cli_end_to_end_with_worker_processes_and_fail_on_new(tmp_path) -> None:
    """The real thing: spawned workers, reports on disk, exit 1 only for failures the corpus lacks."""
    out = tmp_path / "out"
    common = [
        "--device",
        "cpu",
        "--cases-per-cell",
        "1",
        "--ops",
        "legacy.wanvideo_late2025,attn.sdpa.flash",
        "--classes",
        "contiguous,values_beyond_448,hnd_contiguous",
        "--out",
        str(out),
        "--fail-on-new",
        "--no-explore",  # the grid's known defect; what the exploration adds is new (test_matrix_explore)
    ]
    (tmp_path / "empty").mkdir()
    r = _cli(*common, "--corpus", str(tmp_path / "empty"), cwd=REPO)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "NEW  legacy.wanvideo_late2025|values_beyond_448|input_mutation" in r.stdout
    s = load_summary(out)
    assert s["device"]["used"] == "cpu" and s["device"]["torch"]
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    rel = "cases/legacy_wanvideo_late2025-values_beyond_448-input_mutation.json"
    assert f"]({rel})" in md and f"href='{rel}'" in html and (out / rel).exists()
    assert "attn.sdpa.flash" in md and "needs a CUDA device" in md  # listed with its reason

    r2 = _cli(*common, "--force", cwd=REPO)  # the repository's corpus knows this defect
    assert r2.returncode == 0, r2.stdout + r2.stderr[-2000:]
    assert "0 new failure(s)" in r2.stdout


def test_cli_usage_errors_exit_2(tmp_path) -> None:
    r = _cli("--device", "cpu", "--ops", "nope", "--out", str(tmp_path), cwd=REPO)
    assert r.returncode == 2 and "matches no target" in r.stderr


def test_default_corpus_is_the_repository_one() -> None:
    assert DEFAULT_CORPUS == REPO / "tests" / "cases"
    assert load_corpus(DEFAULT_CORPUS, check_files=False)


class TwoDevicePool(InProcessPool):
    """Answers like a pool with workers on two devices: results alternate their device label."""

    def __init__(self, devices, workers_per_device=1, **kw):
        super().__init__(devices, workers_per_device, **kw)
        self.replaced = [("w3", "device fault")]

    def submit(self, case):
        f = super().submit(case)
        r = f.result()
        r.device = f"cuda:{len(self.cases) % 2}"
        return f


def test_the_summary_and_report_show_where_cases_ran(tmp_path) -> None:
    out = tmp_path / "m"
    s = run_matrix(
        device="cpu",
        cases_per_cell=1,
        ops=["fp8_linear"],
        classes=["contiguous", "offset_*"],
        out=out,
        corpus=empty_corpus(tmp_path),
        progress=None,
        pool_factory=lambda *a, **k: TwoDevicePool(["cpu"]),
        explore=False,  # the grid's five cases, spread by the fake pool
    )
    assert s["cases_by_device"] == {"cuda:0": 2, "cuda:1": 3}
    assert sum(s["cases_by_device"].values()) == sum(s["totals"].values())
    assert s["workers_replaced"] == 1
    md = (out / "report.md").read_text()
    assert "| cases per device | cuda:0 2, cuda:1 3 |" in md and "| workers replaced | 1 |" in md


def test_report_header_names_every_gpu_used(monkeypatch) -> None:
    import harness.env
    from harness.matrix import _device_env

    monkeypatch.setattr(harness.env, "collect_env_isolated", lambda **kw: {"device": "NVIDIA H200"})
    two = _device_env(["cuda:0", "cuda:1"])
    assert two["name"] == "2 x NVIDIA H200" and two["devices_used"] == ["cuda:0", "cuda:1"]
    assert _device_env(["cuda:1"])["name"] == "NVIDIA H200"


@pytest.mark.parametrize("gpu_build", [True, False])
def test_the_environment_probe_asks_a_child_exactly_when_this_torch_could_initialise_a_gpu(monkeypatch, gpu_build):
    """The matrix's parent must never initialise a GPU, so a GPU build of torch is probed in a child; a CPU-only
    build has none to initialise, and is probed here (a child would only import torch again)."""
    import harness.env

    children = []
    monkeypatch.setattr(harness.env, "gpu_build", lambda: gpu_build)
    monkeypatch.setattr(harness.env, "collect_env_subprocess", lambda **kw: children.append(kw) or {"device": "child"})
    env = harness.env.collect_env_isolated(timeout=5.0, backends=False)
    if gpu_build:
        assert children == [{"timeout": 5.0, "backends": False}] and env == {"device": "child"}
    else:
        assert children == []
        here = json.loads(json.dumps(harness.env.collect_env(backends=False), default=str))
        assert env == here and env["torch"] == torch.__version__


class StallingPool(InProcessPool):
    """Answers each cell's first case at once; later cases hang until the pool is closed (or, if the driver
    wrongly waits for them, until a 60 s timer answers them as passes)."""

    def __init__(self, devices, workers_per_device=1, clock=None, **kw):
        super().__init__(devices, workers_per_device, **kw)
        self.clock = clock  # the driver's clock: a stalled case uses up the budget
        self.seen: set = set()
        self.stalled: list[Future] = []
        self.timers: list = []
        self.closed_with_cancel = None

    def submit(self, case):
        key = (case.op, case.params.get("layout_class"))
        if key not in self.seen:
            self.seen.add(key)
            return super().submit(case)
        import threading

        f: Future = Future()
        self.stalled.append(f)
        self.clock["t"] += 1000.0
        timer = threading.Timer(60, lambda: f.done() or f.set_result(Result(Verdict.PASS, op=case.op)))
        timer.daemon = True
        timer.start()
        self.timers.append(timer)
        return f

    def close(self, cancel_pending=False):
        self.closed_with_cancel = cancel_pending
        for t in self.timers:
            t.cancel()
        for f in self.stalled:
            if not f.done():
                f.set_result(Result(Verdict.ERROR, f"{POOL_CLOSED} before this case ran"))


def test_spent_budget_drops_later_rounds_without_waiting_for_them(tmp_path, monkeypatch) -> None:
    import types

    import harness.matrix

    clock = {"t": 0.0}  # the budget runs out when, and only when, a later-round case stalls
    monkeypatch.setattr(harness.matrix, "time", types.SimpleNamespace(monotonic=lambda: clock["t"]))
    pool = StallingPool(["cpu"], clock=clock)
    s = run_matrix(
        device="cpu",
        time_budget=10.0,
        ops=["fp8_linear"],
        classes=["contiguous", "offset_2"],
        out=tmp_path / "m",
        corpus=empty_corpus(tmp_path),
        progress=None,
        pool_factory=lambda *a, **k: pool,
    )
    assert pool.stalled, "the driver never submitted a second round"
    assert all(c["cases"] == 1 and c["counts"] == {"pass": 1} for c in s["cells"]), s["cells"]
    assert s["budget_exhausted"] is True and pool.closed_with_cancel is True
    assert 0 <= s["wrapup_s"] <= s["duration_s"]


class AttributingPool(InProcessPool):
    """A pool that attributes on request (as WorkerPool does): the broadcast cells' cases fault."""

    def __init__(self, devices, **kw):
        super().__init__(devices, **kw)
        self.flags: list[bool] = []
        self.attributed: list[str] = []

    def submit(self, case, attribute=True):
        self.flags.append(attribute)
        if case.params.get("layout_class") != "broadcast":
            return super().submit(case)
        self.cases.append(case)
        f: Future = Future()
        f.set_result(Result(Verdict.DEVICE_FAULT, "CUDA error: misaligned address", op=case.op, device="cpu"))
        return f

    def attribute_result(self, case, result, timeout=None):
        self.attributed.append(case.op)
        return Result(**{**result.__dict__, "attribution": {"kernel": "misaligned_kernel", "method": "fake"}})


def test_grid_faults_are_attributed_beside_the_run_once_per_cell_example(tmp_path) -> None:
    # a grid case is never held up by an attribution rerun: it is submitted without one, and only the cell's
    # device-fault example is attributed (in the background), its case file rewritten with the kernel named
    pool = AttributingPool(["cpu"])
    out = tmp_path / "m"
    s = run_matrix(
        device="cpu",
        time_budget=60,
        ops=["legacy.comfyui"],
        classes=["contiguous", "broadcast"],
        out=out,
        cases_per_cell=3,
        corpus=empty_corpus(tmp_path),
        progress=None,
        pool_factory=lambda *a, **k: pool,
        explore=False,
    )
    assert pool.flags and not any(pool.flags)  # every grid case went without a rerun
    assert pool.attributed == ["legacy.comfyui"]  # three faults, one example, one rerun
    cell = next(c for c in s["cells"] if c["layout_class"] == "broadcast")
    assert cell["counts"] == {"device_fault": 3}
    assert "misaligned_kernel" in cell["attribution"]["device_fault"]
    saved, _ = load_case(out / cell["examples"]["device_fault"])
    assert saved.verdict["attribution"]["kernel"] == "misaligned_kernel"  # the file on disk says so too


def test_a_slow_report_rewrite_is_rewritten_less_often(tmp_path, monkeypatch) -> None:
    # each rewrite of the running report holds the interpreter (the pool's dispatcher waits): at most
    # REPORT_SHARE of the run goes to it, however long one rewrite takes
    import harness.matrix as matrix
    import harness.report as report

    monkeypatch.setattr(matrix, "REPORT_EVERY_S", 0.2)
    real, starts = report.write_reports, []

    def slow_write(summary, out):
        starts.append(time.monotonic())
        t = time.perf_counter()
        while time.perf_counter() - t < 0.1:  # the cost of a big report, spent on the CPU
            pass
        return real(summary, out)

    monkeypatch.setattr(report, "write_reports", slow_write)  # run_matrix imports it when it starts
    s = run_matrix(
        device="cpu",
        time_budget=3.0,
        ops=["legacy.wanvideo_late2025"],
        out=tmp_path / "m",
        progress=None,
        pool_factory=lambda *a, **k: InProcessPool(["cpu"]),
        explore=False,
    )
    assert s["totals"] and (tmp_path / "m" / "summary.json").is_file()
    gaps = [b - a for a, b in zip(starts, starts[1:-1])]  # the periodic rewrites (the last one is the final report)
    assert all(g >= 0.1 / matrix.REPORT_SHARE * 0.9 for g in gaps), gaps  # every 2 s, not every 0.2 s


def test_a_first_result_counted_at_the_wrapup_is_not_after_the_end_of_case_work() -> None:
    from harness.report import speed_record

    sp = speed_record(5, 0.0, 12.0, 10.0)
    assert sp["first_result_s"] == 10.0 and sp["case_work_s"] == 10.0 and sp["cases_per_s"] == 0.5


def test_the_summary_report_and_dashboard_give_the_runs_pace(tmp_path) -> None:
    from harness.dashboard.render import _matrix_html

    out = tmp_path / "m"
    s = run_matrix(
        device="cpu",
        cases_per_cell=2,
        explore=False,
        ops=["fp8_linear"],
        out=out,
        corpus=empty_corpus(tmp_path),
        progress=None,
        pool_factory=lambda *a, **k: InProcessPool(["cpu"]),
    )
    sp = s["speed"]
    assert sp["results"] == sum(s["totals"].values()) > 0
    assert 0 < sp["first_result_s"] <= sp["case_work_s"] <= s["duration_s"]
    # case_work_s is rounded to 1 ms and cases_per_s to 0.01: the bound those two roundings allow
    rounding = sp["results"] * 0.0005 / (sp["case_work_s"] - 0.0005) ** 2 + 0.005
    assert abs(sp["cases_per_s"] - sp["results"] / sp["case_work_s"]) <= rounding
    assert sp["cases_per_s_after_first_result"] >= sp["cases_per_s"]  # start-up left out
    line = f"{sp['cases_per_s']:.1f} cases/s over {sp['case_work_s']:.0f} s of case work"
    assert f"| speed | {line} (first result after {sp['first_result_s']:.1f} s;" in (out / "report.md").read_text()
    assert line in _matrix_html(load_summary(out / "summary.json"), str(out / "summary.json"))
