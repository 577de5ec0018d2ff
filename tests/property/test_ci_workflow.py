""".github/workflows/gpu-nightly.yml cannot run here: check its structure and that every command it calls exists.

Every ``python -m harness CMD --opt`` must name a subcommand and options of the real CLI parser, every
``python -m pytest --opt`` an option this repository's pytest accepts, every ``scripts/...`` a file here
(and its options the script's own), and the artifact names the jobs hand each other must match.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from harness.cli import SUBCOMMANDS, _build_parser

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github" / "workflows" / "gpu-nightly.yml"
_EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
_OPS = {";", "&&", "||", "|", ">", ">>", "<", "&", "(", ")"}


def _yaml():
    try:
        import yaml
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("PyYAML missing; CI installs the test extra: pip install -e '.[test]'")
        pytest.skip("PyYAML not installed (pip install -e '.[test]')")
    return yaml


@pytest.fixture(scope="module")
def wf() -> dict:
    data = _yaml().safe_load(WORKFLOW.read_text())
    if True in data:  # YAML 1.1 reads the key `on` as a boolean
        data["on"] = data.pop(True)
    return data


def _render(text: str, values: dict[str, object]) -> str:
    """Substitute ``${{ matrix.x }}`` from ``values``; any other expression becomes ``X``."""
    return _EXPR.sub(lambda m: str(values.get(m.group(1), "X")), text)


def test_jobs_and_their_needs_form_the_nightly_pipeline(wf) -> None:
    jobs = wf["jobs"]
    assert {"plan", "cpu", "gpu", "merge", "example-db", "bench", "pages"} <= set(jobs)
    assert "schedule" in wf["on"] and "workflow_dispatch" in wf["on"]
    needs = {
        name: ([j["needs"]] if isinstance(j.get("needs"), str) else j.get("needs", [])) for name, j in jobs.items()
    }
    for name, deps in needs.items():
        assert set(deps) <= set(jobs), f"{name} needs an unknown job: {deps}"
    order: list[str] = []  # topological order exists: no cycle
    while len(order) < len(jobs):
        ready = [n for n in jobs if n not in order and set(needs[n]) <= set(order)]
        assert ready, f"cycle among {set(jobs) - set(order)}"
        order += ready
    assert {"plan", "cpu"} <= set(needs["gpu"]) and needs["merge"] == ["gpu"] and needs["pages"] == ["bench"]
    assert all("runs-on" in j for j in jobs.values())
    for j in jobs.values():
        for step in j.get("steps", []):
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w./-]+@v\d+", step["uses"]), step["uses"]


def test_the_gpu_matrix_is_arch_by_torch_by_shard_and_the_shards_agree(wf) -> None:
    gpu = wf["jobs"]["gpu"]
    m = gpu["strategy"]["matrix"]
    assert {"arch", "torch", "shard"} <= set(m)
    n = len(m["shard"])
    assert m["shard"] == list(range(1, n + 1))
    assert gpu["env"]["SHARD"].split("#")[0].strip() == f"${{{{ matrix.shard }}}}/{n}"
    assert "${{ matrix.arch }}" in gpu["runs-on"]  # each architecture on its own runners
    assert gpu["strategy"]["fail-fast"] is False  # one shard's failure must not cancel the others
    merge = wf["jobs"]["merge"]["strategy"]["matrix"]
    assert merge["arch"] == m["arch"] and merge["torch"] == m["torch"]
    steps = " ".join(s.get("run", "") for s in gpu["steps"])
    assert '--harness-shard "$SHARD"' in steps and '--shard "$SHARD"' in steps and "needs.plan.outputs.seed" in steps


def test_artifacts_flow_from_the_shards_to_the_merge_and_the_example_database(wf) -> None:
    jobs = wf["jobs"]
    m = jobs["gpu"]["strategy"]["matrix"]
    uploads = [
        s["with"]["name"] for s in jobs["gpu"]["steps"] if s.get("uses", "").startswith("actions/upload-artifact")
    ]
    shard_name = next(u for u in uploads if u.startswith("shard-"))
    db_name = next(u for u in uploads if u.startswith("hypothesis-db-"))
    pattern = next(
        s["with"]["pattern"]
        for s in jobs["merge"]["steps"]
        if s.get("uses", "").startswith("actions/download-artifact")
    )
    for arch in m["arch"]:
        for torch_v in m["torch"]:
            mine = _render(pattern, {"matrix.arch": arch, "matrix.torch": torch_v})
            for a2 in m["arch"]:
                for shard in m["shard"]:
                    name = _render(shard_name, {"matrix.arch": a2, "matrix.torch": torch_v, "matrix.shard": shard})
                    assert fnmatch.fnmatchcase(name, mine) == (a2 == arch), (name, mine)
    db = jobs["example-db"]["steps"]
    assert fnmatch.fnmatchcase(_render(db_name, {}), db[0]["with"]["pattern"]) and db[0]["with"]["merge-multiple"]
    final = db[1]["with"]["name"]
    runs = " ".join(s.get("run", "") for s in jobs["gpu"]["steps"])
    assert f"github://${{{{ github.repository }}}}/{final}" in runs  # tomorrow's runners read what tonight saved
    assert any(s.get("uses", "").startswith("actions/cache/restore") for s in jobs["bench"]["steps"])
    assert any(s.get("uses", "").startswith("actions/cache/save") for s in jobs["bench"]["steps"])
    assert any(s.get("uses", "").startswith("actions/upload-pages-artifact") for s in jobs["bench"]["steps"])


def test_the_cpu_job_installs_what_the_cpu_suite_needs(wf) -> None:
    runs = " ".join(s.get("run", "") for s in wf["jobs"]["cpu"]["steps"])
    assert "redis-server" in runs and "'.[test]'" in runs and wf["jobs"]["cpu"]["env"]["CI"]


# ------------------------------------------------------------------ every command exists


def _commands(wf) -> list[list[str]]:
    """Every shell command line of every ``run`` step, as tokens (expressions replaced by ``X``)."""
    out = []
    for job in wf["jobs"].values():
        for step in job.get("steps", []):
            script = _render(step.get("run", ""), {}).replace("\\\n", " ")
            for line in script.splitlines():
                lex = shlex.shlex(line, posix=True, punctuation_chars=True)
                lex.whitespace_split = True
                lex.commenters = "#"
                tokens = list(lex)
                cmd: list[str] = []
                for t in tokens + [";"]:
                    if t in _OPS:
                        if cmd:
                            out.append(cmd)
                        cmd = []
                    else:
                        cmd.append(t)
    return out


def _options(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


@cache
def _pytest_help() -> str:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


def _harness_options(cmd: str) -> set[str]:
    parser = _build_parser([cmd])
    sub = next(a for a in parser._actions if a.dest == "command").choices[cmd]
    return {o for a in sub._actions for o in a.option_strings}


def test_every_command_the_workflow_calls_exists(wf) -> None:
    seen = {"harness": set(), "pytest": 0, "scripts": set()}
    for cmd in _commands(wf):
        while cmd and re.fullmatch(r"[A-Z_]+=.*", cmd[0]):  # VAR=value prefixes
            cmd = cmd[1:]
        for i, tok in enumerate(cmd):
            rest = cmd[i + 1 :]
            if tok in ("python", "python3") and rest[:2] == ["-m", "harness"]:
                sub = rest[2]
                assert sub in SUBCOMMANDS, f"python -m harness {sub}: no such subcommand"
                unknown = set(_options(rest[3:])) - _harness_options(sub)
                assert not unknown, f"python -m harness {sub}: unknown options {unknown}"
                seen["harness"].add(sub)
            elif tok in ("python", "python3") and rest[:2] == ["-m", "pytest"]:
                helptext = _pytest_help()
                for opt in _options(rest[2:]) + [o for o in rest[2:] if o in ("-n", "-m", "-p")]:
                    assert re.search(rf"(^|[\s,]){re.escape(opt)}([\s=,]|$)", helptext, re.MULTILINE), f"pytest {opt}?"
                for path in (a for a in rest[2:] if a.startswith("tests/")):
                    assert (REPO / path).exists(), path
                seen["pytest"] += 1
            elif tok.startswith("scripts/"):
                path = REPO / tok
                assert path.is_file(), f"{tok} does not exist"
                if path.suffix == ".py":
                    helptext = subprocess.run(
                        [sys.executable, str(path), "--help"],
                        cwd=REPO,
                        capture_output=True,
                        text=True,
                        timeout=60,
                        check=True,
                    ).stdout
                    for opt in _options(rest):
                        assert opt in helptext, f"{tok} has no option {opt}"
                    for arg in (a for a in rest if a.startswith("tests/")):
                        assert (REPO / arg).exists(), arg
                else:
                    assert os.access(path, os.X_OK), f"{tok} is not executable"
                seen["scripts"].add(tok)
    assert seen["harness"] == {"env", "matrix", "merge", "dashboard"}
    assert seen["pytest"] >= 2
    assert seen["scripts"] == {"scripts/replay_all.py", "scripts/gpu_bench.sh"}
