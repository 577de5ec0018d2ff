"""``scripts/gpu_nightly.sh`` end to end on the CPU (``MATRIX_DEVICE=cpu``): every step runs, writes where it
says, and the script's exit status is the first failing step's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_at_once

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_nightly.sh"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils timeout"
    ),
]


def _decoy_path(tmp: Path) -> str:
    """PATH with a ``python3`` first that only leaves a mark: a script that calls a bare python3 is caught."""
    bin_dir = tmp / "decoy-bin"
    bin_dir.mkdir(exist_ok=True)
    decoy = bin_dir / "python3"
    decoy.write_text(f'#!/bin/sh\necho "$@" >> {tmp / "decoy-called"}\nexit 97\n')
    decoy.chmod(0o755)
    return os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])


def _env(tmp: Path, **kw: str) -> dict[str, str]:
    return dict(
        os.environ,
        PYTHON=sys.executable,
        PATH=_decoy_path(tmp),
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        **kw,
    )


def _nightly(out: Path, matrix_args: str) -> tuple[list[str], dict]:
    """The nightly script's command on the CPU (``run_at_once`` form), writing into ``out``."""
    env = _env(
        out.parent,
        OUT=str(out),
        MATRIX_DEVICE="cpu",
        MATRIX_BUDGET="300",
        MATRIX_ARGS=f"--cases-per-cell 1 {matrix_args}",
        PYTEST_ARGS="-k known_defect_keeps_its_verdict",
        STEP_TIMEOUT="600",
    )
    return ["bash", str(SCRIPT)], {"env": env}


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The three script runs the tests below judge, started at once (each its own folder, decoy and output;
    they share nothing)."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("clean", "failing", "bench")}
    # ComfyUI's broadcast fallback is a layout_noninvariance; against an empty corpus it is new
    (dirs["failing"] / "no-corpus").mkdir()
    failing = (
        f"--ops legacy.comfyui --classes broadcast --fail-on-new --no-explore --corpus {dirs['failing']}/no-corpus"
    )
    runs = run_at_once(
        _nightly(dirs["clean"] / "out", "--ops fp8_linear --classes contiguous,offset_2 --quiet --no-explore"),
        _nightly(dirs["failing"] / "out", failing),
        (
            ["bash", str(REPO / "scripts" / "gpu_bench.sh"), "-k", "bench_linear"],
            {"env": _env(dirs["bench"], OUT=str(dirs["bench"] / "out"))},
        ),
        timeout=900,
        cwd=REPO,
    )
    return {name: (dirs[name], cp) for name, cp in zip(("clean", "failing", "bench"), runs)}


def test_nightly_script_runs_every_step_and_passes_on_a_clean_run(script_runs) -> None:
    tmp, cp = script_runs["clean"]
    out = tmp / "out"
    assert not (tmp / "decoy-called").exists(), "the script ran a bare python3, not $PYTHON"
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr[-3000:]
    assert json.loads((out / "env.json").read_text())["torch"]
    summary = json.loads((out / "matrix" / "summary.json").read_text())
    assert summary["device"]["used"] == "cpu" and summary["totals"] == {"pass": 2}
    assert (out / "pytest-gpu.xml").is_file() and "matrix exit 0" in cp.stderr and "pytest exit 0" in cp.stderr


def test_nightly_script_exits_with_the_first_failing_step_and_still_runs_the_rest(script_runs) -> None:
    tmp, cp = script_runs["failing"]
    out = tmp / "out"
    assert not (tmp / "decoy-called").exists(), "the script ran a bare python3, not $PYTHON"
    assert cp.returncode == 1, cp.stdout[-2000:] + cp.stderr[-3000:]
    assert "matrix exit 1" in cp.stderr
    replays = json.loads((out / "replay.json").read_text())  # the case it wrote was still replayed
    assert [r["expected"] for r in replays] == ["layout_noninvariance"] and replays[0]["rc"] == 0, replays
    assert (out / "pytest-gpu.xml").is_file() and "pytest exit 0" in cp.stderr


def test_bench_script_uses_the_interpreter_it_is_given(script_runs) -> None:
    """On the CPU every benchmark is a GPU one and skips, so no run is saved: the dashboard says so, exit 2. Every
    step ran under $PYTHON (the decoy python3 first on PATH was never called)."""
    tmp, cp = script_runs["bench"]
    assert not (tmp / "decoy-called").exists(), "gpu_bench.sh ran a bare python3, not $PYTHON"
    assert cp.returncode == 2, cp.stdout[-2000:] + cp.stderr[-2000:]
    assert "no usable pytest-benchmark runs found" in cp.stderr and "torch" in cp.stdout  # env ran, then dashboard
