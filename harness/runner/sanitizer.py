"""``compute-sanitizer --tool memcheck`` text -> a structured record of what faulted.

memcheck prints every error as a block of lines behind its prefix (``=========``)::

    ========= Invalid __global__ read of size 16 bytes
    =========     at void Kernel<float>(const float *, int)+0x1c0 in kernel.cu:42
    =========     by thread (32,0,0) in block (0,3,1)
    =========     Address 0x7f2a4c000202 is misaligned
    =========     and is inside the nearest allocation at 0x7f2a4c000000 of size 2,097,152 bytes
    =========     Saved host backtrace up to driver entry point at kernel launch time
    =========         Host Frame: launch(at::Tensor) in fused.cu:210 [0x4a1b2] in _fused.cpython-311-x86_64-linux-gnu.so
    =========
    ========= ERROR SUMMARY: 1 error

Versions differ in the details, and the parser takes each of the forms seen in the manual and in public
reports: ``at 0x1c0 in file.cu:42:kernel`` (older) or ``at kernel+0x1c0 [in file:line]`` (newer); ``Address``,
``Access at`` or ``Access to``; host frames as ``lib.so (symbol + 0x34e) [0x..]`` (cuda-memcheck),
``symbol [0x..]`` with ``in lib.so`` on the next line, or all on one line. :func:`parse_memcheck` returns
None for text that is no memcheck report; it never raises.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

__all__ = [
    "AccessError",
    "HostFrame",
    "MemcheckReport",
    "parse_memcheck",
    "short_kernel_name",
    "sanitizer_unusable",
]

_PREFIX = re.compile(r"^\s*=========(?: (?P<body>.*))?$")
_HEADLINE = re.compile(
    r"^Invalid (?P<space>__\w+?__|\w+) (?P<kind>read|write|atomic|access)\w*(?: of size (?P<size>[\d,]+)(?: bytes?)?)?",
    re.IGNORECASE,
)
_AT_NEW = re.compile(r"^at (?P<name>.+)\+(?P<off>0x[0-9a-fA-F]+)(?: in (?P<src>.+))?$")
_AT_OLD = re.compile(r"^at (?P<off>0x[0-9a-fA-F]+) in (?P<rest>.+)$")
_SRC_NAME = re.compile(r"^(?P<src>[^\s()<>]+:\d+):(?P<name>.+)$")
_THREAD = re.compile(r"by thread \((?P<t>[\d, ]+)\) in block \((?P<b>[\d, ]+)\)")
_ADDRESS = re.compile(r"^(?:Address|Access(?: at| to)?) (?P<addr>0x[0-9a-fA-F]+) is (?P<problem>.+?)\.?$")
_ALLOC = re.compile(
    r"^and is (?:(?P<n>[\d,]+) bytes? (?P<dir>after|before)|(?P<inside>inside)) the nearest allocation "
    r"at (?P<base>0x[0-9a-fA-F]+) of size (?P<size>[\d,]+) bytes?"
)
_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(?P<n>[\d,]+) errors?")
_FRAME_PC = re.compile(r"^(?P<body>.*?)\s*\[(?P<pc>0x[0-9a-fA-F]+)\](?:\s+in\s+(?P<mod>.+))?$")
_FRAME_OLD = re.compile(r"^(?P<mod>\S+) \((?P<sym>.+?)(?: \+ 0x[0-9a-fA-F]+)?\)$")
_FRAME_SRC_NEW = re.compile(r"^(?P<sym>.+) in (?P<src>[^\s()<>]+:\d+)$")
_EXT_SUFFIX = re.compile(r"\.(?:cpython-[^./]*|abi3|pypy[^./]*)\.so$|\.so$")
#: tool-level lines (not errors of the program) that say the sanitizer itself could not check it
_UNUSABLE = (
    "internal sanitizer error",
    "not supported",
    "driver",
    "failed to initialize",
    "unable to",
    "no attachable process",
    "terminated before first instrumented api call",
)


@dataclasses.dataclass(frozen=True)
class HostFrame:
    """One ``Host Frame:`` line: ``symbol`` (demangled as printed, '' when unnamed), ``module`` (the binary),
    ``source`` (``file:line`` when printed)."""

    symbol: str
    module: str
    source: str = ""

    @property
    def in_python_extension(self) -> bool:
        """The frame is in a Python extension module (``pkg/_mod.cpython-311-x86_64-linux-gnu.so``)."""
        base = os.path.basename(self.module)
        if re.search(r"\.(?:cpython-[^./]*|abi3|pypy[^./]*)\.so$", base):
            return True
        return base.endswith(".so") and not base.startswith("lib")

    @property
    def python_module(self) -> str:
        """The extension's dotted module name, as far as the path tells (``sageattention._fused``)."""
        path = self.module.replace("\\", "/")
        for marker in ("site-packages/", "dist-packages/"):
            if marker in path:
                path = path.split(marker, 1)[1]
                break
        else:
            path = "/".join(path.split("/")[-2:]) if "/" in path else path
        return _EXT_SUFFIX.sub("", path).strip("/").replace("/", ".")

    def text(self) -> str:
        """``symbol in file:line (module)`` in one line."""
        where = f" in {self.source}" if self.source else ""
        return f"{self.symbol or '?'}{where} ({self.module or '?'})"


@dataclasses.dataclass(frozen=True)
class AccessError:
    """One memcheck error. ``headline`` as printed; ``kind`` read/write/atomic, ``space`` global/shared/local
    and ``size`` (bytes) when the headline is an invalid access; ``kernel`` as printed (None: an API error
    or a record without an ``at`` line); ``relation``: where the address lies relative to the allocation."""

    headline: str
    kind: str | None = None
    space: str | None = None
    size: int | None = None
    kernel: str | None = None
    kernel_offset: str | None = None
    source: str | None = None
    thread: tuple[int, ...] | None = None
    block: tuple[int, ...] | None = None
    address: str | None = None
    problem: str | None = None
    relation: str | None = None
    allocation: dict[str, Any] | None = None
    host_frames: tuple[HostFrame, ...] = ()

    @property
    def misaligned_by(self) -> int | None:
        """Bytes past the last ``size``-byte boundary, for a misaligned address (None otherwise)."""
        if not (self.address and self.size and self.problem and "misaligned" in self.problem):
            return None
        return int(self.address, 16) % self.size

    @property
    def extension_frame(self) -> HostFrame | None:
        """The first host frame (innermost first) in a Python extension module: the op that launched it."""
        return next((f for f in self.host_frames if f.in_python_extension), None)

    @property
    def python_frame(self) -> str | None:
        """A Python-level frame (``file.py:line``), when the host backtrace shows one."""
        for f in self.host_frames:
            for where in (f.source, f.module):
                if where and re.search(r"\.py(?::\d+)?$", where):
                    return f"{where} in {f.symbol}" if f.symbol else where
        return None

    def access(self) -> dict[str, Any]:
        """``attribution["access"]``: kind, space, size, address, problem, relation (plain JSON)."""
        d: dict[str, Any] = {
            "what": self.headline,
            "kind": self.kind,
            "space": self.space,
            "size": self.size,
            "address": self.address,
            "problem": self.problem,
            "relation": self.relation,
        }
        if self.misaligned_by is not None:
            d["misaligned_by"] = self.misaligned_by
        if self.allocation:
            d["allocation"] = dict(self.allocation)
        if self.thread is not None:
            d["thread"] = list(self.thread)
        if self.block is not None:
            d["block"] = list(self.block)
        return {k: v for k, v in d.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class MemcheckReport:
    """A parsed report: its ``errors`` in order, ``total`` from ``ERROR SUMMARY`` (or the count parsed), and
    ``tool_errors``: lines where the tool itself complained (``Error: ...``, ``Internal Sanitizer Error``)."""

    errors: tuple[AccessError, ...]
    total: int
    tool_errors: tuple[str, ...] = ()

    @property
    def first(self) -> AccessError | None:
        """The first error in a kernel (what faulted first), else the first error of any kind."""
        return next((e for e in self.errors if e.kernel), self.errors[0] if self.errors else None)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.replace(" ", "").split(",") if p)


def _num(text: str) -> int:
    return int(text.replace(",", ""))


def _frame(text: str) -> HostFrame:
    m = _FRAME_PC.match(text.strip())
    body, mod = (m["body"].strip(), (m["mod"] or "").strip()) if m else (text.strip(), "")
    source = ""
    if not mod:
        old = _FRAME_OLD.match(body)
        if old:
            return HostFrame(old["sym"].strip(), old["mod"])
        if body and " " not in body and "(" not in body and ("/" in body or "\\" in body):
            return HostFrame("", body)  # cuda-memcheck: a path with no symbol
    s = _FRAME_SRC_NEW.match(body)
    if s:
        body, source = s["sym"], s["src"]
    else:
        s = _SRC_NAME.match(body)
        if s:
            body, source = s["name"], s["src"]
    return HostFrame(body.strip(), mod, source)


class _Builder:
    def __init__(self, headline: str) -> None:
        self.f: dict[str, Any] = {"headline": headline}
        h = _HEADLINE.match(headline)
        if h:
            self.f["kind"] = h["kind"].lower()
            self.f["space"] = h["space"].strip("_").lower()
            self.f["size"] = _num(h["size"]) if h["size"] else None
        self.frames: list[HostFrame] = []

    def line(self, text: str) -> None:
        if text.startswith("Host Frame:"):
            self.frames.append(_frame(text[len("Host Frame:") :]))
        elif text.startswith("in ") and self.frames and not self.frames[-1].module:
            last = self.frames[-1]
            self.frames[-1] = dataclasses.replace(last, module=text[3:].strip())
        elif text.startswith("at ") and "kernel" not in self.f:
            self._at(text)
        elif (t := _THREAD.search(text)) and "thread" not in self.f:
            self.f["thread"], self.f["block"] = _ints(t["t"]), _ints(t["b"])
        elif (a := _ADDRESS.match(text)) and "address" not in self.f:
            self.f["address"], self.f["problem"] = a["addr"], a["problem"].strip()
        elif (al := _ALLOC.match(text)) and "relation" not in self.f:
            self.f["relation"] = text[len("and is ") :].rstrip(".")
            alloc = {"base": al["base"], "size": _num(al["size"])}
            if al["inside"]:
                alloc["where"] = "inside"
                if "address" in self.f:
                    alloc["offset"] = int(self.f["address"], 16) - int(al["base"], 16)
            else:
                alloc["where"], alloc["bytes"] = al["dir"], _num(al["n"])
            self.f["allocation"] = alloc

    def _at(self, text: str) -> None:
        new = _AT_NEW.match(text)
        if new:
            self.f.update(kernel=new["name"].strip(), kernel_offset=new["off"], source=new["src"])
            return
        old = _AT_OLD.match(text)
        if old:
            rest = old["rest"].strip()
            sn = _SRC_NAME.match(rest)
            name, src = (sn["name"], sn["src"]) if sn else (rest, None)
            self.f.update(kernel=name.strip(), kernel_offset=old["off"], source=src)

    def build(self) -> AccessError:
        return AccessError(**self.f, host_frames=tuple(self.frames))


def _is_tool_line(body: str) -> bool:
    low = body.lower()
    return low.startswith("error:") or low.startswith("internal sanitizer error") or "sanitizer error" in low


def parse_memcheck(text: Any) -> MemcheckReport | None:
    """The errors of a ``compute-sanitizer --tool memcheck`` report, or None when ``text`` holds none of its
    lines (not a report: the tool did not run, or the text is something else). Never raises."""
    try:
        return _parse(str(text) if text is not None else "")
    except Exception:  # noqa: BLE001 - a report we cannot read is no report, never a crash of the harness
        return None


def _parse(text: str) -> MemcheckReport | None:
    errors: list[AccessError] = []
    tools: list[str] = []
    total: int | None = None
    seen = False
    cur: _Builder | None = None
    for raw in text.splitlines():
        m = _PREFIX.match(raw.rstrip())
        if m is None:
            continue  # the program's own output, interleaved
        seen = True
        body = m["body"] or ""
        stripped = body.strip()
        if not stripped:
            if cur is not None:
                errors.append(cur.build())
                cur = None
            continue
        if body[:1] != " ":  # a record's first line, or a line of the tool's own
            if cur is not None:
                errors.append(cur.build())
                cur = None
            s = _SUMMARY.search(stripped)
            if s:
                total = _num(s["n"])
            elif stripped.upper().startswith(("COMPUTE-SANITIZER", "CUDA-MEMCHECK", "LEAK SUMMARY")):
                pass
            elif _is_tool_line(stripped) or stripped.lower().startswith("target application"):
                tools.append(stripped)
            else:
                cur = _Builder(stripped)
        elif cur is not None:
            cur.line(stripped)
    if cur is not None:
        errors.append(cur.build())
    if not seen:
        return None
    return MemcheckReport(tuple(errors), total if total is not None else len(errors), tuple(tools))


def sanitizer_unusable(text: str, report: MemcheckReport | None) -> str | None:
    """Why a sanitized run says nothing about the program (the tool failed on this machine), or None.

    No report at all, or a tool-level line about an unsupported device, a driver mismatch, an internal
    error. A program that crashed or exited non-zero under the tool is not the tool failing."""
    if report is None:
        first = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
        return "compute-sanitizer printed no report" + (f" (first line: {first[:200]})" if first else "")
    for line in report.tool_errors:
        low = line.lower()
        if any(m in low for m in _UNUSABLE):
            return f"compute-sanitizer could not check this program here: {line[:300]}"
    return None


def short_kernel_name(name: str) -> str:
    """A kernel name as printed, without its return type, template arguments and parameters
    (``void ns::K<int, 4>(const int *)`` -> ``ns::K``)."""
    s = name.strip()
    for lead in ("void ", "__global__ void "):
        if s.startswith(lead):
            s = s[len(lead) :]
    out, depth = [], 0
    for ch in s:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    short = re.sub(r"\s+const$", "", "".join(out).strip()).replace("::::", "::")
    return short.split(" ")[-1] if short else s
