"""``python -m harness env`` and the import-time promise (no CUDA work at import)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def env_json() -> subprocess.CompletedProcess:
    return _run("env", "--json")


def test_env_json_is_machine_readable_and_lists_backends(env_json) -> None:
    out = env_json
    assert out.returncode == 0, out.stderr
    env = json.loads(out.stdout)
    assert env["torch"] == torch.__version__
    assert env["cuda"] == torch.version.cuda
    assert env["device"] == ("cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0))
    assert isinstance(env["backends"], dict) and env["backends"]
    for name, info in env["backends"].items():
        assert isinstance(info["available"], bool), name
        assert isinstance(info["reason"], str), name
        if not info["available"]:
            assert info["reason"], f"{name} is unavailable without a reason"


def test_env_table_names_every_backend(env_json) -> None:
    table = _run("env")
    assert table.returncode == 0, table.stderr
    env = json.loads(env_json.stdout)
    assert "attention backends" in table.stdout
    for name in env["backends"]:
        assert name in table.stdout


def test_importing_the_package_initialises_no_cuda() -> None:
    code = (
        "import importlib, pkgutil, torch, harness\n"
        "mods = ['harness.' + m.name for m in pkgutil.iter_modules(harness.__path__)]\n"
        "mods += ['harness.reference', 'harness.quant', 'harness.runner']\n"
        "skip = {'harness.__main__'}\n"
        "for m in mods:\n"
        "    if m not in skip: importlib.import_module(m)\n"
        "print(torch.cuda.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_unknown_subcommand_and_bare_call_fail_cleanly() -> None:
    bare = _run()
    assert bare.returncode == 2 and "env" in bare.stdout
    bad = _run("frobnicate")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
