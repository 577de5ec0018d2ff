"""Every third-party module the harness imports is a declared dependency (a new virtual environment has
nothing else)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")

REPO = Path(__file__).resolve().parents[2]

#: imported only inside a capability check, with a skip reason when missing (GPU-only or optional extras)
OPTIONAL = {"triton", "sageattention", "redis"}
#: needed although never imported by name: safetensors.torch.save_file / load_file convert through numpy
INDIRECT = {"numpy"}
#: distribution name -> top-level module, where they differ
MODULE_OF = {"pytest-benchmark": "pytest_benchmark"}


def _imported_modules() -> set[str]:
    found: set[str] = set()
    for path in (REPO / "harness").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"harness", "__future__"}


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def mods(reqs: list[str]) -> set[str]:
        names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip() for r in reqs}
        return {MODULE_OF.get(n, n.replace("-", "_")) for n in names}

    extras = {m for reqs in project.get("optional-dependencies", {}).values() for m in mods(reqs)}
    return mods(project["dependencies"]), extras


def test_every_imported_third_party_module_is_declared() -> None:
    required, extras = _declared()
    missing = _imported_modules() - required - OPTIONAL
    assert not missing, f"imported by harness/ but not in pyproject.toml dependencies: {sorted(missing)}"
    assert INDIRECT <= required, f"indirect runtime needs not declared: {sorted(INDIRECT - required)}"
    assert {"sageattention", "redis"} <= extras  # the optional one has its extra
