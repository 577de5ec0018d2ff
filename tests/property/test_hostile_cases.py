"""Reliability figures for hostile case files: every class -> exit code, one line on stderr, bounded time and memory.

Each class of hostile input (deep JSON, huge offsets and shapes, FIFOs, ``/dev/zero``, directories, surrogates and
terminal escapes, dtype names outside the allow-list, loose ``schema_version``, tensor files that do not match their
layouts, pickles, oversize files, stale temp files, ...) is written to disk and handed to ``show``, ``replay``,
``replay --bisect`` and ``minimize``.  All of it runs in ONE driver subprocess (this file run with ``--drive``):
it imports torch and the harness once, caps its address space with ``RLIMIT_AS`` (the measured import footprint
plus :data:`HEADROOM` bytes: a hostile file that made the harness allocate gigabytes fails with ``MemoryError``
instead of passing quietly), and forks one child per (class, tool), two at a time, each with its own stdout/stderr
files, a wall-clock timeout and its peak RSS from ``wait4``.  The assertions: the documented exit code, exactly one line on
stderr naming the problem (none for a valid file), no traceback, no raw escape sequence on stdout, bounded time
and memory.

``python tests/property/test_hostile_cases.py`` prints the table (class -> exit codes -> message).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Address space allowed above what importing torch and the harness took (a fresh replay worker fits in it too).
HEADROOM = 1 << 30
#: Seconds one tool may take on one hostile file (a case that is refused is refused at load: well under a second).
JOB_TIMEOUT = 60.0
#: Peak RSS one child may reach (the parent's ~0.3 GB of torch is shared into it).
MAX_RSS_KB = 1_000_000
#: Forked children running at once (most refuse their file in milliseconds; the valid ones start a worker).
AT_ONCE = 2

TOOLS = {"show": ["show"], "replay": ["replay"], "replay --bisect": ["replay", "--bisect"], "minimize": ["minimize"]}
HARNESS = {"show": 2, "replay": 2, "replay --bisect": 128, "minimize": 2}
VALID = {"show": 0, "replay": 0, "replay --bisect": 0, "minimize": 1}  # a passing case: nothing to minimize

GOOD = {
    "schema_version": 1,
    "op": "cpu.scale",
    "layouts": {"x": {"shape": [4, 8], "dtype": "float32"}},
    "values": {"x": {"kind": "normal", "seed": 1}},
    "env": {"device_type": "cpu"},
}


@dataclass
class Hostile:
    """One class of hostile input: how to build it, what each tool must answer."""

    name: str
    build: Callable[[Path], Path]  # writes the input under a fresh folder, returns the path to pass
    message: str  # regex the one stderr line must match ("" for a valid file: stderr stays empty)
    codes: dict[str, int] = field(default_factory=lambda: dict(HARNESS))
    stdout_must_not: tuple[bytes, ...] = (b"\x1b", b"\x07")


def _json(payload: object) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        p = d / "c.json"
        p.write_text(payload if isinstance(payload, str) else json.dumps(payload))
        return p

    return build


def _layout(**fields: object) -> dict:
    return {**GOOD, "layouts": {"x": {**GOOD["layouts"]["x"], **fields}}}


def _with_tensors(tensors: Callable[[], dict] | bytes) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        from safetensors.torch import save_file

        p = _json(GOOD)(d)
        st = d / "c.safetensors"
        if isinstance(tensors, bytes):
            st.write_bytes(tensors)
        else:
            save_file(tensors(), str(st))
        return p

    return build


def _truncated(d: Path) -> Path:
    import torch
    from safetensors.torch import save

    p = _json(GOOD)(d)
    (d / "c.safetensors").write_bytes(save({"x": torch.zeros(4, 8)})[:-40])
    return p


class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/harness-hostile-pwned", "w"))


def _interrupted_save(d: Path) -> Path:
    import torch

    from harness.cases import Case, save_case

    first = Case.from_dict(GOOD)
    save_case(first, d / "c", {"x": torch.zeros(4, 8)})
    tensors = (d / "c.safetensors").read_bytes()
    save_case(Case.from_dict({**GOOD, "verdict": {"verdict": "drift"}}), d / "c", {"x": torch.ones(4, 8)})
    (d / "c.safetensors").write_bytes(tensors)  # what a kill between the two renames leaves
    return d / "c.json"


def _stale_temps(d: Path) -> Path:
    p = _json(GOOD)(d)
    for name in (".c.json.999999999-0badc0de.tmp", ".c.safetensors.999999999-0badc0df.tmp", "c.json.tmp"):
        (d / name).write_bytes(b"\x00" * 4096)
    return p


def _fifo(d: Path) -> Path:
    os.mkfifo(d / "c.json")
    return d / "c.json"


def _symlink(target: str) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        (d / "c.json").symlink_to(target)
        return d / "c.json"

    return build


def _not_utf8(d: Path) -> Path:
    (d / "c.json").write_bytes(b'{"schema_version": 1, "op": "\xff\xfe"}')
    return d / "c.json"


def _dev_zero_tensors(d: Path) -> Path:
    _json(GOOD)(d)
    (d / "c.safetensors").symlink_to("/dev/zero")
    return d / "c.json"


def _dir_named_json(d: Path) -> Path:
    (d / "x.json").mkdir()
    return d / "x.json"


def _dir_of_cases(d: Path) -> Path:
    (d / "cases").mkdir()
    _json(GOOD)(d / "cases")
    return d / "cases"


def _oversize(d: Path) -> Path:
    p = d / "c.json"
    with open(p, "w") as f:
        f.write('{"schema_version": 1, "op": "cpu.scale", "note": "')
        f.write("x" * (17 << 20))
        f.write('"}')
    return p


def _oversize_tensors(d: Path) -> Path:
    p = _json(GOOD)(d)
    with open(d / "c.safetensors", "wb") as f:
        f.truncate(3 << 20)  # the layouts need 128 bytes (+ a 1 MiB header allowance)
    return p


def _hostile_classes() -> list[Hostile]:
    import torch

    return [
        Hostile("deep JSON (100k levels)", _json("[" * 100_000 + "]" * 100_000), "nests deeper than 64 levels"),
        Hostile("huge offset (259-byte file, offset 5e8)", _json(_layout(offset=500_000_000)), "over the budget of"),
        Hostile("huge shape [10^12]", _json(_layout(shape=[10**12])), "over the budget of"),
        Hostile(
            "huge integer literal (5000 digits)",
            _json('{"schema_version": ' + "1" * 5000 + "}"),
            "is not valid JSON: Exceeds the limit",
        ),
        Hostile("17 dims", _json(_layout(shape=[1] * 17)), "at most 16 are supported"),
        Hostile("FIFO as case file", _fifo, r"is a FIFO \(named pipe\), not a case file"),
        Hostile("symlink to /dev/zero", _symlink("/dev/zero"), "is a device, not a case file"),
        Hostile("tensor file -> /dev/zero", _dev_zero_tensors, "is a device, not a safetensors file"),
        Hostile("directory named x.json", _dir_named_json, "is a directory, not a case file"),
        Hostile(
            "directory of cases", _dir_of_cases, r"is a directory, not a case file; name a case file in it, e\.g\."
        ),
        Hostile("missing file (a typo)", lambda d: d / "typo.json", "does not exist"),
        Hostile("oversize JSON (17 MiB)", _oversize, "is larger than 16777216 bytes"),
        Hostile("oversize tensor file (3 MiB for 128 B)", _oversize_tensors, "tensor file .* is larger than"),
        Hostile("not UTF-8", _not_utf8, "not UTF-8"),
        Hostile("lone surrogate in op", _json({**GOOD, "op": "\ud800"}), r"case 'op' must be a non-empty printable"),
        Hostile("escape sequence in op", _json({**GOOD, "op": "cpu.scale\x1b[2J"}), "printable string"),
        Hostile(
            "escape sequences + surrogate in note (valid)",
            _json({**GOOD, "note": "\x1b]0;owned\x07\x1b[2J\x1b[31mred\udcff", "backend": "\x1b[5m"}),
            "",
            codes=dict(VALID),
        ),
        Hostile("dtype '_dynamo'", _json(_layout(dtype="_dynamo")), "'_dynamo' is not a supported dtype"),
        Hostile("dtype 'qint8'", _json(_layout(dtype="qint8")), "'qint8' is not a supported dtype"),
        Hostile("dtype 'float4_e2m1fn_x2'", _json(_layout(dtype="float4_e2m1fn_x2")), "'float4_e2m1fn_x2' is not"),
        Hostile("schema_version true", _json({**GOOD, "schema_version": True}), "schema_version must be an integer"),
        Hostile("schema_version 1.0", _json({**GOOD, "schema_version": 1.0}), "schema_version must be an integer"),
        Hostile(
            "schema_version 2 (newer harness)",
            _json({**GOOD, "schema_version": 2}),
            "written by a newer harness",
            codes={"show": 2, "replay": 125, "replay --bisect": 125, "minimize": 125},
        ),
        Hostile("bool in shape", _json(_layout(shape=[True, 8])), "must be a list of integers"),
        Hostile(
            "stored dtype != layout dtype",
            _with_tensors(lambda: {"x": torch.zeros(4, 8, dtype=torch.float16)}),
            "tensor 'x' is float16, its layout says float32",
        ),
        Hostile(
            "stored shape != layout shape",
            _with_tensors(lambda: {"x": torch.zeros(8, 4)}),
            r"tensor 'x' has shape \(8, 4\), its layout says \(4, 8\)",
        ),
        Hostile("truncated safetensors", _truncated, "is not a valid safetensors file"),
        Hostile("pickle renamed .safetensors", _with_tensors(pickle.dumps(_Evil())), "is not a valid safetensors file"),
        Hostile("save killed between its renames", _interrupted_save, "was not written with this c.json"),
        Hostile("stale temp files beside a valid case", _stale_temps, "", codes=dict(VALID)),
    ]


# ------------------------------------------------------------------------------ the driver (a subprocess)


def _vm_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _drive(jobs: list[dict]) -> dict:
    """Run every job in a forked child of this (torch-imported, address-space-capped) process."""
    import resource
    import select
    import signal
    import time
    import traceback

    import harness.cases  # noqa: F401 - imported once here, shared by every forked child
    import harness.runner.minimize  # noqa: F401
    import harness.runner.pool  # noqa: F401
    import harness.runner.replay  # noqa: F401
    import safetensors.torch  # noqa: F401
    from harness.cli import main as cli_main

    import_kb = _vm_kb("VmPeak")
    limit = import_kb * 1024 + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))

    def start(job: dict) -> tuple[int, int, list, float]:
        files = [tempfile.TemporaryFile() for _ in range(3)]  # stdout, stderr, facts
        sys.stdout.flush()
        sys.stderr.flush()
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: one CLI call, as `python -m harness ...` makes it
            code = 1
            try:
                os.chdir(job["cwd"])
                os.dup2(files[0].fileno(), 1)
                os.dup2(files[1].fileno(), 2)
                try:
                    code = int(cli_main(job["argv"]) or 0)
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
                except BaseException:
                    traceback.print_exc()
                    code = 1
                sys.stdout.flush()
                sys.stderr.flush()
                os.write(
                    files[2].fileno(),
                    json.dumps({"dynamo": any(m.startswith("torch._dynamo") for m in sys.modules)}).encode(),
                )
            finally:
                os._exit(code)
        return pid, os.pidfd_open(pid), files, t0

    def reap(job: dict, pid: int, pidfd: int, files: list, t0: float, timed_out: bool) -> dict:
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        _, status, usage = os.wait4(pid, 0)
        os.close(pidfd)
        seconds = time.monotonic() - t0
        out = []
        for f in files:
            f.seek(0)
            out.append(f.read())
            f.close()
        return {
            "name": job["name"],
            "tool": job["tool"],
            "code": os.waitstatus_to_exitcode(status),
            "timed_out": timed_out,
            "seconds": round(seconds, 2),
            "maxrss_kb": usage.ru_maxrss,
            "stdout": out[0].decode("utf-8", "backslashreplace"),
            "stderr": out[1].decode("utf-8", "backslashreplace"),
            "raw_stdout_hex": out[0].hex(),
            "facts": json.loads(out[2] or b"{}"),
        }

    results: list = [None] * len(jobs)
    pending = list(enumerate(jobs))
    running: dict[int, tuple] = {}  # pidfd -> (index, pid, files, t0)
    while pending or running:
        while pending and len(running) < AT_ONCE:
            i, job = pending.pop(0)
            pid, pidfd, files, t0 = start(job)
            running[pidfd] = (i, pid, files, t0)
        now = time.monotonic()
        poller = select.poll()
        for pidfd in running:
            poller.register(pidfd, select.POLLIN)
        first_deadline = min(t0 + jobs[i]["timeout"] for i, _, _, t0 in running.values())
        ready = {fd for fd, _ in poller.poll(max(0.0, first_deadline - now) * 1000)}
        now = time.monotonic()
        for pidfd, (i, pid, files, t0) in list(running.items()):
            timed_out = pidfd not in ready and now >= t0 + jobs[i]["timeout"]
            if pidfd in ready or timed_out:
                del running[pidfd]
                results[i] = reap(jobs[i], pid, pidfd, files, t0, timed_out)
    return {"import_vmpeak_kb": import_kb, "rlimit_as": limit, "results": results}


def run_all(root: Path) -> tuple[list[Hostile], dict]:
    """Build every class under ``root`` and run every tool on it in one driver subprocess."""
    classes = _hostile_classes()
    jobs = []
    for i, h in enumerate(classes):
        d = root / f"class{i:02d}"
        d.mkdir(parents=True)
        target = h.build(d)
        for tool, argv in TOOLS.items():
            jobs.append(
                {
                    "name": h.name,
                    "tool": tool,
                    "cwd": str(d),
                    "timeout": JOB_TIMEOUT,
                    "argv": [argv[0], str(target), *argv[1:], *(["--device", "cpu"] if argv[0] != "show" else [])],
                }
            )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    cp = subprocess.run(
        [sys.executable, __file__, "--drive"],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        env=env,
        timeout=JOB_TIMEOUT * len(jobs),
    )
    assert cp.returncode == 0, cp.stderr[-3000:]
    return classes, json.loads(cp.stdout)


def table(classes: list[Hostile], report: dict) -> str:
    """Markdown: class -> exit code of each tool -> the one line show / replay printed."""
    by = {(r["name"], r["tool"]): r for r in report["results"]}
    lines = [
        "| hostile input | " + " | ".join(TOOLS) + " | message (replay's stderr line) |",
        "|---" * (len(TOOLS) + 2) + "|",
    ]
    for h in classes:
        codes = " | ".join(str(by[h.name, t]["code"]) for t in TOOLS)
        msg = by[h.name, "replay"]["stderr"].strip() or by[h.name, "minimize"]["stderr"].strip() or "-"
        msg = re.sub(r"/\S*/class\d+/", "", msg)
        lines.append(f"| {h.name} | {codes} | {msg[:150].replace('|', '/')} |")
    worst_s = max(r["seconds"] for r in report["results"])
    worst_mb = max(r["maxrss_kb"] for r in report["results"]) / 1024
    lines.append(
        f"\n{len(classes)} classes x {len(TOOLS)} tools, under RLIMIT_AS = {report['rlimit_as'] / 2**30:.2f} GiB "
        f"(import footprint {report['import_vmpeak_kb'] / 2**20:.2f} GiB + 1 GiB); slowest call {worst_s:.1f} s, "
        f"largest peak RSS {worst_mb:.0f} MB"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    if not hasattr(os, "pidfd_open") or not os.path.exists("/proc/self/status"):
        pytest.skip("the hostile-input driver needs Linux (pidfd_open, /proc)")
    return run_all(tmp_path_factory.mktemp("hostile"))


def test_there_are_enough_hostile_classes(hostile_run):
    classes, report = hostile_run
    assert len(classes) >= 15
    # the cap sits well above what importing torch takes, and well below what an unchecked hostile file costs
    assert report["import_vmpeak_kb"] * 1024 < report["rlimit_as"] < 4 * 10**9


@pytest.mark.parametrize("index", range(len(_hostile_classes())), ids=[h.name for h in _hostile_classes()])
def test_hostile_input_gets_its_exit_code_and_one_line(hostile_run, index):
    classes, report = hostile_run
    h = classes[index]
    for r in (r for r in report["results"] if r["name"] == h.name):
        where = f"{h.name} / {r['tool']}: stdout={r['stdout'][-500:]!r} stderr={r['stderr'][-1500:]!r}"
        assert not r["timed_out"], f"hung past {JOB_TIMEOUT} s: {where}"
        assert "Traceback" not in r["stderr"] + r["stdout"], where
        assert r["code"] == h.codes[r["tool"]], where
        lines = r["stderr"].splitlines()
        if h.message:
            assert len(lines) == 1 and re.search(h.message, lines[0]), where
            assert lines[0].startswith(f"harness {r['tool'].split()[0]}: "), where
        elif r["tool"] == "minimize":
            assert len(lines) == 1 and "does not fail here" in lines[0], where
        else:
            assert lines == [], where
        raw = bytes.fromhex(r["raw_stdout_hex"])
        assert not any(bad in raw for bad in h.stdout_must_not), where
        assert r["seconds"] < JOB_TIMEOUT and r["maxrss_kb"] < MAX_RSS_KB, where
        assert not r["facts"].get("dynamo"), f"torch._dynamo was imported: {where}"
    assert not os.path.exists("/tmp/harness-hostile-pwned")


def test_show_prints_the_valid_hostile_note_escaped(hostile_run):
    classes, report = hostile_run
    r = next(r for r in report["results"] if r["tool"] == "show" and r["name"].startswith("escape sequences"))
    assert r"note: \x1b]0;owned\x07\x1b[2J\x1b[31mred\udcff" in r["stdout"] and r"backend: \x1b[5m" in r["stdout"]


if __name__ == "__main__":
    if sys.argv[1:] == ["--drive"]:
        print(json.dumps(_drive(json.load(sys.stdin))))
    else:
        with tempfile.TemporaryDirectory(prefix="harness-hostile-") as tmp:
            print(table(*run_all(Path(tmp))))
