"""``matrix --plugin`` on a user's own kernel, end to end through the CLI, from the directory that holds it.

The kernel module lies in the current directory only (no PYTHONPATH entry for it, and
``PYTHONSAFEPATH=1`` so that Python itself does not put the directory on ``sys.path``): the
harness's own rule (the current directory is importable for plug-ins) is what finds it, in the
probe, the matrix's workers and ``replay``'s fresh process alike.  The case files it writes are
enough for ``show``, ``replay`` and ``minimize``: no ``HARNESS_PLUGINS``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import harness_argv, run_at_once

REPO = Path(__file__).resolve().parents[2]

KERNEL = textwrap.dedent('''
    def my_linear(x, w):
        """clamps the caller's activation in place (the defect the matrix must find)"""
        x.clamp_(-448.0, 448.0)
        return (x.float().contiguous() @ w.float().T).to(x.dtype)

    def needs_scale(x, w, scale):
        return (x.float().contiguous() @ w.float().T).to(x.dtype) * scale
''')


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARNESS_") and k != "PYTEST_ADDOPTS"}
    env.update(PYTHONPATH=str(REPO), PYTHONSAFEPATH="1")
    return env


def _harness(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(harness_argv(*args), cwd=cwd, capture_output=True, text=True, env=_env(), timeout=timeout)


def _matrix_argv(spec: str, out: Path, classes: str) -> list[str]:
    return harness_argv(
        "matrix",
        "--device",
        "cpu",
        "--plugin",
        spec,
        "--ops",
        "plugin.*",
        "--classes",
        classes,
        "--no-explore",
        "--cases-per-cell",
        "1",
        "--workers",
        "1",
        "--quiet",
        "--out",
        str(out),
    )


#: the matrix runs the tests below judge: (plug-in spec, layout classes)
RUNS = {
    "my_linear": ("user_kernel_cli:my_linear", "contiguous,values_beyond_448"),
    "needs_scale": ("user_kernel_cli:needs_scale", "contiguous,transposed"),
    "nowhere": ("user_kernel_nowhere:my_linear", "contiguous"),
}


@pytest.fixture(scope="module")
def matrix_runs(tmp_path_factory) -> dict[str, tuple[Path, Path, subprocess.CompletedProcess]]:
    """Every RUNS entry run from a user's directory holding the kernel module, all at once: (that directory,
    the run's --out, the result).  The tests only read what the runs wrote."""
    root = tmp_path_factory.mktemp("plugin_cli")
    repo = root / "user_repo"
    repo.mkdir()
    (repo / "user_kernel_cli.py").write_text(KERNEL)
    outs = {name: root / name for name in RUNS}
    results = run_at_once(
        *(_matrix_argv(spec, outs[name], classes) for name, (spec, classes) in RUNS.items()),
        timeout=300,
        cwd=repo,
        env=_env(),
    )
    return {name: (repo, outs[name], cp) for name, cp in zip(RUNS, results)}


def test_matrix_judges_the_cases_a_two_argument_kernel_can_take_and_the_case_file_is_enough(
    matrix_runs, tmp_path: Path
) -> None:
    repo, out, cp = matrix_runs["my_linear"]
    assert cp.returncode == 0, cp.stdout + cp.stderr
    summary = json.loads((out / "summary.json").read_text())
    counts = {c["layout_class"]: c["counts"] for c in summary["cells"]}
    assert counts == {"contiguous": {"pass": 1}, "values_beyond_448": {"input_mutation": 1}}, counts

    cell = next(c for c in summary["cells"] if c["layout_class"] == "values_beyond_448")
    case_path = out / cell["examples"]["input_mutation"]
    case = json.loads(case_path.read_text())
    assert case["op"] == "plugin.user_kernel_cli:my_linear"
    assert case["params"]["plugin"] == {
        "spec": "user_kernel_cli:my_linear",
        "kind": "linear",
        "convention": "op",
        "takes": [],
    }

    minimal = tmp_path / "minimal.json"
    show, replay, mini = run_at_once(  # three readers of the case file, independent of each other
        *(
            harness_argv(*args)
            for args in (("show", case_path), ("replay", case_path), ("minimize", case_path, "--out", minimal))
        ),
        timeout=300,
        cwd=repo,
        env=_env(),
    )
    assert show.returncode == 0 and '"spec": "user_kernel_cli:my_linear"' in show.stdout, show.stdout + show.stderr
    assert replay.returncode == 1, replay.stdout + replay.stderr  # still fails: exit 1, not 125 "unknown target"
    assert replay.stdout.startswith("[input_mutation] plugin.user_kernel_cli:my_linear"), replay.stdout
    assert mini.returncode == 0 and minimal.exists(), mini.stdout + mini.stderr
    again = _harness(repo, "replay", str(minimal))
    assert again.returncode == 1 and again.stdout.startswith("[input_mutation]"), again.stdout + again.stderr


def test_cases_the_harness_cannot_call_fail_the_run_and_head_the_report(matrix_runs) -> None:
    _, out, cp = matrix_runs["needs_scale"]
    assert cp.returncode == 1, cp.stdout + cp.stderr
    assert "2 failing cells" in cp.stdout and "UNSUPPORTED  2 case(s)" in cp.stdout, cp.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"] == {"unsupported": 2}
    assert all(c["status"] == "fail" for c in summary["cells"])
    report = (out / "report.md").read_text()
    head = report.index("## The harness could not run these (2 cases, verdict unsupported)")
    assert head < report.index("| op |") and head < report.index("## New failures")
    assert "missing a required argument: 'scale'" in report[head : report.index("## New failures")]
    html = (out / "report.html").read_text()
    assert html.index("The harness could not run these") < html.index("<table class='grid'>")


def test_a_plugin_that_does_not_import_fails_fast_with_one_line(matrix_runs) -> None:
    _, out, cp = matrix_runs["nowhere"]
    assert cp.returncode == 2, cp.stdout + cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert lines == [
        "harness matrix: plug-in 'user_kernel_nowhere:my_linear': no module named "
        "'user_kernel_nowhere' (run from the directory that holds it, or put that directory on "
        "PYTHONPATH)"
    ], cp.stderr
    assert not (out / "summary.json").exists()


def test_the_readmes_pytest_route_finds_the_clamp_and_writes_the_shrunk_case(tmp_path: Path) -> None:
    import re

    block = re.search(r"```python\n# test_my_linear.py\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block, "README lost its pytest example"
    (tmp_path / "test_my_linear.py").write_text(block.group(1))
    (tmp_path / "my_kernels").mkdir()
    (tmp_path / "my_kernels" / "__init__.py").write_text("")
    (tmp_path / "my_kernels" / "fp8.py").write_text(
        textwrap.dedent("""
        def my_linear(x, w):
            if x.abs().max() > 448:
                x.clamp_(-448.0, 448.0)  # only when needed -- but on the caller's tensor
            return (x.float().contiguous() @ w.float().T).to(x.dtype)
    """)
    )
    env = {k: v for k, v in _env().items() if k != "PYTHONSAFEPATH"}
    cp = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "harness.pytest_plugin",
            "-p",
            "no:cacheprovider",
            "-q",
            "--hypothesis-seed=0",
            "--harness-cases-dir",
            "cases",
            "test_my_linear.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    out = cp.stdout + cp.stderr
    assert cp.returncode == 1 and "harness: expected pass, got input_mutation" in out, out
    (written,) = (tmp_path / "cases").glob("*.json")
    case = json.loads(written.read_text())
    assert case["op"] == "plugin.my_kernels.fp8:my_linear" and case["verdict"]["verdict"] == "input_mutation"
    assert case["params"]["plugin"]["takes"] == [] and case["params"]["weight_scale"] is None
