"""The pytest plugin, end to end: a Hypothesis test failing through the worker pool leaves its
*shrunk* case on disk, the assertion carries the numbers and the replay command, and a device
fault gets a "harness attribution" section naming the faulting op.

Runs an inner pytest in a subprocess (its own pools, its own options), on CPU workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

INNER = textwrap.dedent("""
    from hypothesis import given, settings, strategies as st
    from harness.cases import Case
    from harness.layouts import LayoutSpec
    from harness.pytest_plugin import assert_case_passes

    @settings(max_examples=40, deadline=None, database=None, derandomize=True)
    @given(n=st.integers(1, 64), off=st.integers(0, 16))
    def test_offset_layouts(n, off):
        # fault.layout adds 1 at a non-zero storage offset: fails iff off > 0; minimal n=1, off=1
        assert_case_passes(Case(op="fault.layout", layouts={"x": LayoutSpec((n,), "float32", offset=off)}),
                           device="cpu")

    def test_sticky(cpu_case_runner):
        cpu_case_runner.assert_passes(Case(op="fault.sticky", layouts={"x": LayoutSpec((2, 2), "float32")}))

    def test_clean(cpu_case_runner):
        r = cpu_case_runner.assert_passes(Case(op="fault.reject", layouts={"x": LayoutSpec((2, 2), "float32",
                                                                                         offset=1, pad=(0, 1))}),
                                          allow=["pass", "rejected"])
        assert r.verdict.value == "rejected"
""")


def test_plugin_writes_the_shrunk_case_and_attributes_faults(tmp_path):
    (tmp_path / "test_inner.py").write_text(INNER)
    cases = tmp_path / "cases"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("PYTEST_ADDOPTS", None)
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
            "--harness-cases-dir",
            str(cases),
            "--harness-case-timeout",
            "60",
            "test_inner.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    out = cp.stdout + cp.stderr
    assert cp.returncode == 1, out
    assert "2 failed, 1 passed" in out, out

    # the Hypothesis test: the file named after the test holds the minimal example
    stem = "test_inner_py_test_offset_layouts"
    case = json.loads((cases / f"{stem}.json").read_text())
    assert case["layouts"]["x"]["shape"] == [1] and case["layouts"]["x"]["offset"] == 1
    assert case["verdict"]["verdict"] == "layout_noninvariance"
    assert "harness: expected pass, got layout_noninvariance" in out
    assert f"replay: python -m harness replay {cases / stem}.json" in out

    # the device fault: attribution done once, at report time, and written into the case file
    assert "harness attribution" in out and "faulting op: harness_fault::bad_kernel" in out
    sticky = json.loads((cases / "test_inner_py_test_sticky.json").read_text())
    assert sticky["verdict"]["attribution"]["op"] == "harness_fault::bad_kernel"
    assert not (cases / "test_inner_py_test_clean.json").exists()  # allowed verdicts write nothing
