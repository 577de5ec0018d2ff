"""``python -m harness matrix``'s exploration phase: the grid first, then each op explored for the rest of the budget.

The CLI run below uses the default settings (grid share, seed, minimization) on the ops of the regression
corpus that run on CPU, for a shorter budget than the default (and only the ops those findings are of); it must reproduce every CPU corpus finding
*through the exploration* and report each signature once with a replayable minimal case.  The kernels of
``test_explore_defects`` (one defect each, tied to one operand's layout, a tile-boundary size or a structured
value) are then run through ``run_matrix`` without naming their defects.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from harness.cases import load_case
from harness.matrix import WRAPUP_BOUND_S, run_matrix
from harness.matrix_explore import explore_key
from harness.runner.execute import run_case
from harness.runner.targets import register_target
from harness.shard import shard_of
from harness.targets.corpus import DEFAULT_CORPUS, load_corpus
from tests.helpers import InProcessPool, empty_corpus, harness_argv, run_at_once

REPO = Path(__file__).resolve().parents[2]
#: a backstop for the whole command (the run ends on its case counts well before it)
BUDGET = 120.0
#: drawn cases per op: every CPU corpus finding is reproduced within about 30 (seed 0)
EXPLORE_CASES = 100
#: the ops of the corpus's CPU entries (the default run explores every op: 180 s for ~25 CPU ops)
CPU_CORPUS_OPS = "legacy.comfyui,legacy.user_fixed,legacy.wanvideo_late2025"


def _argv(*args: str) -> list[str]:
    return harness_argv("matrix", "--device", "cpu", "--quiet", *args)


def _matrix(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        _argv(*args),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def legacy_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("explore") / "m"
    # bounded by cases, not by the clock: one grid round, then EXPLORE_CASES drawn cases per op (a loaded machine
    # takes longer, it does not see fewer cases); BUDGET only backstops the whole command
    cp = _matrix(
        "--ops",
        CPU_CORPUS_OPS,
        "--cases-per-cell",
        "1",
        "--explore-cases",
        str(EXPLORE_CASES),
        "--time-budget",
        str(BUDGET),
        "--out",
        str(out),
    )
    return out, cp


def test_the_exploration_reproduces_every_cpu_corpus_finding(legacy_run) -> None:
    out, cp = legacy_run
    assert cp.returncode == 0, cp.stdout + cp.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["duration_s"] <= BUDGET + WRAPUP_BOUND_S
    ex = s["explore"]
    assert ex["enabled"] and ex["cases"] > 0
    cpu_entries = {e.fingerprint for e in load_corpus(DEFAULT_CORPUS) if e.device == "cpu"}
    assert len(cpu_entries) >= 8
    rows = {c["fingerprint"]: c for c in ex["corpus"]}
    missed = [fp for fp in cpu_entries if not rows[fp]["reproduced"]]
    assert not missed, [rows[fp] for fp in missed]
    for fp in cpu_entries:  # by an explored case: its note names its operand-wise properties
        assert rows[fp]["note"].startswith("explored: ") and rows[fp]["after_cases"] >= 1
    cuda_rows = [c for c in ex["corpus"] if c["fingerprint"] not in cpu_entries]
    assert cuda_rows and all(not c["reproduced"] and "no CUDA device" in c["skipped"] for c in cuda_rows)
    assert "explore: " in cp.stdout and f"reproduced by the exploration: {len(cpu_entries)}/{len(cpu_entries)}" in (
        cp.stdout
    )


def test_each_signature_is_reported_once_with_a_minimal_case_that_replays(legacy_run) -> None:
    out, _ = legacy_run
    s = json.loads((out / "summary.json").read_text())
    ops = s["explore"]["ops"]
    assert {"legacy.comfyui", "legacy.user_fixed", "legacy.wanvideo_late2025"} <= set(ops)
    replayed = 0
    for op, d in ops.items():
        sigs = [(f["verdict"], f["operand"], f["property"]) for f in d["findings"]]
        assert len(sigs) == len(set(sigs)), op  # each signature once
        assert sum(f["count"] for f in d["findings"]) >= len(sigs)
        for f in d["findings"]:
            assert f["operand"] and f["property"] and f["case"], f
            assert (out / f["case"]).is_file() and (out / f["case"]).with_suffix(".safetensors").is_file()
            if f["verdict"] == "input_mutation" and replayed < 3:  # deterministic: the same verdict again
                case, tensors = load_case(out / f["case"])
                assert case.params["layout_class"] == "explore" and case.params["explore"]["perturbations"] is not None
                assert run_case(case, "cpu", values=tensors or None).verdict.value == "input_mutation", f
                replayed += 1
    assert replayed == 3
    in_place = [f for f in ops["legacy.comfyui"]["findings"] if f["verdict"] == "input_mutation"]
    assert in_place and all(set(f["operand"].split("+")) <= {"x", "shape"} and f["known"] for f in in_place), in_place
    new = [n for n in s["new_failures"] if n["layout_class"] == "explore"]
    assert all(n["signature"] and n["fingerprint"] == f"{n['op']}|explore|{n['verdict']}" for n in new)
    report = (out / "report.md").read_text()
    assert "## Exploration (" in report and "### Regression corpus reproduced by the exploration: 8/8" in report


def test_the_grid_alone_when_asked_and_bad_options_in_one_line(tmp_path) -> None:
    out = tmp_path / "grid"
    bad = [
        (("--grid-share", "0"), "--grid-share 0.0 must be in (0, 1]"),
        (("--grid-share", "1.5"), "--grid-share 1.5 must be in (0, 1]"),
        (("--explore-cases", "0"), "--explore-cases 0 must be >= 1"),
    ]
    cp, *refused = run_at_once(  # independent runs
        _argv(
            "--ops", "fp8_linear", "--classes", "contiguous", "--cases-per-cell", "1", "--no-explore", "--out", str(out)
        ),
        *(_argv("--ops", "fp8_linear", *args, "--out", str(tmp_path / "x")) for args, _ in bad),
        timeout=300,
        cwd=REPO,
    )
    assert cp.returncode == 0, cp.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["explore"] == {"enabled": False} and s["totals"] == {"pass": 1}
    for (_, msg), cp in zip(bad, refused):
        lines = cp.stderr.strip().splitlines()
        assert cp.returncode == 2 and len(lines) == 1 and msg in lines[0], cp.stderr
        assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_a_bounded_run_explores_a_bounded_number_of_cases(tmp_path) -> None:
    s = run_matrix(
        device="cpu",
        time_budget=120,
        ops=["fp8_linear"],
        classes=["contiguous"],
        cases_per_cell=1,
        out=tmp_path / "m",
        corpus=empty_corpus(tmp_path),
        progress=None,
        pool_factory=lambda *a, **k: InProcessPool(["cpu"]),
    )
    d = s["explore"]["ops"]["fp8_linear"]
    assert d["cases"] == 20 and d["stopped"] == "budget_cases"  # EXPLORE_CASES_PER_ROUND x 1
    assert sum(s["totals"].values()) == 1 + d["cases"] + d["minimize_runs"]  # explored results are counted


def test_defects_tied_to_one_operand_a_tile_size_or_a_value_are_found_without_being_named(tmp_path) -> None:
    from tests.property.test_explore_defects import ChannelAmaxLinear, KTailLinear, PlainLinear, VAlign2Attention

    for cls in (KTailLinear, ChannelAmaxLinear, PlainLinear, VAlign2Attention):
        register_target(cls, replace=True)  # the registry fixture removes them afterwards
    names = [c.name for c in (KTailLinear, ChannelAmaxLinear, PlainLinear, VAlign2Attention)]
    s = run_matrix(  # one grid round, then 200 drawn cases per op (each defect is found within its first 80)
        device="cpu",
        time_budget=25,
        ops=names,
        out=tmp_path / "m",
        corpus=empty_corpus(tmp_path),
        progress=None,
        pool_factory=lambda *a, **k: InProcessPool(["cpu"]),
        cases_per_cell=1,
        explore_cases=200,
    )
    ops = s["explore"]["ops"]
    sigs = {op: {(f["verdict"], f["operand"], f["property"]) for f in d["findings"]} for op, d in ops.items()}
    assert ("layout_noninvariance", "v", "v: pointer aligned to 2 B") in sigs[VAlign2Attention.name], sigs
    assert all(operand == "v" for _, operand, _ in sigs[VAlign2Attention.name]), sigs
    assert any(v == "drift" and o == "shape" and "k = " in p for v, o, p in sigs[KTailLinear.name]), sigs
    assert ("nonfinite", "x", "x: an all-zero channel") in sigs[ChannelAmaxLinear.name], sigs
    assert sigs[PlainLinear.name] == set() and ops[PlainLinear.name]["cases"] > 20


def test_shards_explore_each_op_once_and_merge_into_one_section(tmp_path) -> None:
    ops = "legacy.comfyui,legacy.user_fixed,fp8_linear"
    outs = {i: tmp_path / f"s{i}" for i in (1, 2)}
    common = ("--classes", "contiguous", "--cases-per-cell", "1", "--explore-cases", "50", "--workers", "1")
    shards = run_at_once(  # the two shards, as two machines would run them: at once
        *(_argv("--ops", ops, *common, "--shard", f"{i}/2", "--out", str(outs[i])) for i in (1, 2)),
        timeout=300,
        cwd=REPO,
    )
    for cp in shards:
        assert cp.returncode == 0, cp.stderr[-2000:]
    explored = {i: set(json.loads((outs[i] / "summary.json").read_text())["explore"]["ops"]) for i in (1, 2)}
    assert explored[1].isdisjoint(explored[2]) and explored[1] | explored[2] == set(ops.split(","))
    for i in (1, 2):
        assert all(shard_of(explore_key(op), 2) == i for op in explored[i])
    merged = tmp_path / "merged"
    cp = subprocess.run(
        harness_argv("merge", str(outs[1]), str(outs[2]), "--out", str(merged)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert cp.returncode == 0, cp.stderr
    m = json.loads((merged / "summary.json").read_text())
    assert set(m["explore"]["ops"]) == set(ops.split(","))
    assert m["explore"]["cases"] == sum(
        json.loads((outs[i] / "summary.json").read_text())["explore"]["cases"] for i in (1, 2)
    )
    for d in m["explore"]["ops"].values():
        for f in d["findings"]:
            assert f["case"] and (merged / f["case"]).is_file(), f
    rows = {c["fingerprint"]: c for c in m["explore"]["corpus"]}
    assert rows["legacy.comfyui|outliers|input_mutation"]["reproduced"]  # whichever shard explored the op
    assert "## Exploration (" in (merged / "report.md").read_text()


def test_large_offset_draws_are_on_for_cuda_and_sized_from_the_probed_memory() -> None:
    from harness.matrix_explore import ExplorePhase

    env = {"devices": [{"index": 0, "memory_gib": 80.0}, {"index": 1, "memory_gib": 40.0}]}

    def phase(device: str, **kw) -> ExplorePhase:
        return ExplorePhase(
            [], None, device=device, seed=0, deadline=0.0, on_result=None, stop_reason=str, env=env, **kw
        )

    on = phase("cuda:1")
    assert on.large_offsets and on.free_bytes == 20 * 2**30  # half of what the probe reported for that GPU
    assert phase("cuda:0").free_bytes == 40 * 2**30
    assert not phase("cuda:0", large_offsets=False).large_offsets  # --no-large-offsets
    off = phase("cpu")
    assert not off.large_offsets and off.free_bytes is None


def test_a_device_fault_signature_is_attributed_once_and_its_case_file_says_so(tmp_path) -> None:
    import time
    from concurrent.futures import Future

    from harness.matrix_explore import ExplorePhase, save_into
    from harness.runner.targets import get_target
    from harness.verdicts import Result, Verdict

    target = get_target("attn.emu.naive")
    asked: list[str] = []

    def submit(case):  # a fake pool: v aligned to 2 B faults, everything else passes
        f: Future = Future()
        v = case.layouts["v"]
        bad = v.offset * v.itemsize % 4 == 2
        f.set_result(Result(Verdict.DEVICE_FAULT, "misaligned address") if bad else Result(Verdict.PASS, ""))
        return f

    def attribute(case, r, timeout):
        asked.append(case.note)
        return Result(**{**r.__dict__, "attribution": {"kernel": "K", "method": "fake", "timeout": timeout}})

    phase = ExplorePhase(
        [target],
        submit,
        device="cpu",
        seed=0,
        deadline=time.monotonic() + 60,
        on_result=lambda c, r: None,
        stop_reason=str,
        max_cases=40,
        attribute=attribute,
    )
    phase.start()
    assert phase.wait(time.monotonic() + 60)
    s = phase.summary(save_into(tmp_path, (), lambda w: None))
    (f,) = [f for f in s["ops"][target.name]["findings"] if f["verdict"] == "device_fault"]
    assert (f["operand"], f["property"]) == ("v", "v: pointer aligned to 2 B")
    assert asked == ["explored: v: pointer aligned to 2 B"]  # one rerun, for the minimal case only
    assert f["attribution"]["kernel"] == "K" and 0 < f["attribution"]["timeout"] <= 60
    saved, _ = load_case(tmp_path / f["case"])
    assert saved.verdict["attribution"]["kernel"] == "K"  # the case file was written attributed
