"""harness.pytest_fleet: the worker -> GPU mapping, a real ``pytest -n`` run, and ``--harness-shard``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import run_at_once

from harness.pytest_fleet import (
    GPU_COUNT_ENV,
    device_for_worker,
    gpus_to_hand_out,
    worker_index,
)
from harness.shard import shard_of

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("xdist", reason="pytest-xdist not installed (pip install 'harness[xdist]')")


@pytest.mark.parametrize("wid, want", [("gw0", 0), ("gw13", 13), ("master", None), (None, None), ("gwx", None)])
def test_worker_index(wid, want) -> None:
    assert worker_index(wid) == want


def test_eight_workers_on_four_gpus_take_each_gpu_twice() -> None:
    gpus = gpus_to_hand_out({GPU_COUNT_ENV: "4"}, count=lambda: pytest.fail("the override must win"))
    got = [device_for_worker(f"gw{k}", gpus) for k in range(8)]
    assert got == ["0", "1", "2", "3", "0", "1", "2", "3"]


def test_an_inherited_cuda_visible_devices_is_shared_out_verbatim() -> None:
    gpus = gpus_to_hand_out({"CUDA_VISIBLE_DEVICES": "2, GPU-5a1b,7"}, count=lambda: 99)
    assert [device_for_worker(f"gw{k}", gpus) for k in range(4)] == ["2", "GPU-5a1b", "7", "2"]


def test_no_gpu_or_no_worker_leaves_the_environment_alone() -> None:
    assert gpus_to_hand_out({"CUDA_VISIBLE_DEVICES": ""}, count=lambda: 4) == []
    assert device_for_worker("gw0", gpus_to_hand_out({}, count=lambda: 0)) is None
    assert device_for_worker("master", ["0", "1"]) is None
    assert gpus_to_hand_out({}, count=lambda: 3) == ["0", "1", "2"]


def test_a_bad_gpu_count_names_the_fix() -> None:
    with pytest.raises(ValueError, match="HARNESS_GPU_COUNT='two' must be a whole number"):
        gpus_to_hand_out({GPU_COUNT_ENV: "two"})


def _pytest_argv(tmp_path: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "harness.pytest_fleet",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(tmp_path),
        "-o",
        "addopts=",
        *args,
    ]


def _pytest_env(env: dict[str, str]) -> dict[str, str]:
    return dict(env, PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))


def _pytest(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        _pytest_argv(tmp_path, *args),
        cwd=tmp_path,
        env=_pytest_env(env),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("n, gpus", [("2", "2"), ("auto", "3")])
def test_real_xdist_workers_each_see_their_own_gpu(tmp_path, n: str, gpus: str) -> None:
    (tmp_path / "test_tiny.py").write_text(
        textwrap.dedent(f"""
        import os
        def test_record():
            wid = os.environ["PYTEST_XDIST_WORKER"]
            with open(os.path.join({str(tmp_path)!r}, "seen-" + wid), "w") as f:
                f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
    """)
    )
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env[GPU_COUNT_ENV] = gpus
    r = _pytest(tmp_path, "-n", n, "--dist", "each", "-q", "test_tiny.py", env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    seen = {p.name[len("seen-") :]: p.read_text() for p in tmp_path.glob("seen-*")}
    want = int(gpus)
    assert sorted(seen) == [f"gw{k}" for k in range(want)]  # -n auto: one worker per GPU
    assert {seen[f"gw{k}"] for k in range(want)} == {str(k) for k in range(want)}
    assert all(seen[f"gw{k}"] == str(k) for k in range(want))


def test_harness_shard_splits_the_collected_tests(tmp_path) -> None:
    (tmp_path / "test_many.py").write_text(
        textwrap.dedent("""
        import pytest
        @pytest.mark.parametrize("i", range(30))
        def test_p(i):
            pass
    """)
    )
    every = None
    shares = []
    specs = (None, "1/3", "2/3", "3/3")
    runs = run_at_once(  # independent collections
        *(
            _pytest_argv(tmp_path, "--collect-only", "-q", "test_many.py", *(["--harness-shard", s] if s else []))
            for s in specs
        ),
        timeout=300,
        cwd=tmp_path,
        env=_pytest_env(dict(os.environ)),
    )
    for spec, r in zip(specs, runs):
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        ids = [line for line in r.stdout.splitlines() if "::" in line]
        if spec is None:
            every = ids
        else:
            i = int(spec[0])
            assert ids == [x for x in every if shard_of(x, 3) == i]
            shares.append(ids)
    assert len(every) == 30 and sorted(x for s in shares for x in s) == sorted(every)  # disjoint and complete
    assert all(shares)


def test_a_bad_shard_is_one_usage_line(tmp_path) -> None:
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    r = _pytest(tmp_path, "-q", "test_one.py", "--harness-shard", "4/3", env=dict(os.environ))
    assert r.returncode == 4
    assert "--harness-shard: shard index 4 must be between 1 and 3" in r.stderr
