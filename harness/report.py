"""Matrix reports: ``summary.json`` (machine-readable), ``report.md`` and ``report.html`` (people).

The matrix driver (:mod:`harness.matrix`) aggregates worker results into one
*summary* dict; this module validates it and renders it.  Rendering is pure
(no torch, no CUDA): a summary can be re-rendered on any machine, and the
dashboard reads ``summary.json`` directly.

Summary schema (``SUMMARY_SCHEMA_VERSION`` = 1), all plain JSON::

    {
      "schema_version": 1, "kind": "harness.matrix.summary",
      "started_at": ISO-8601, "duration_s": float, "budget_s": float,
      "budget_exhausted": bool,          # true when the time budget cut rounds short
      "wrapup_s": float,                 # optional: from the end of case work to the reports
      "completed": bool,                 # optional: the run finished (not interrupted, some case ran)
      "status": "running" | "completed" | "interrupted" | "no_results",   # optional (older summaries lack it)
      "interrupted": str,                # optional: why the run stopped early ("SIGTERM", "SIGINT", "harness error: ...")
      "warnings": [str, ...],            # optional: one line each (e.g. a case file that could not be written)
      "command": str,                    # the command line that produced it
      "device": {"used": "cuda"|"cpu", "name", "capability", "torch", "cuda", "cudnn",
                 "cublas", "driver", "python", "platform", ...},
      "totals": {verdict: count},        # over every case that ran
      "cases_by_device": {device: count},  # optional: where the cases ran (the pool's spread over GPUs)
      "workers_replaced": int,           # optional: workers the pool replaced (faults, timeouts, crashes)
      "speed": {"results", "case_work_s", "cases_per_s", "first_result_s",   # optional: the run's pace
                "cases_per_s_after_first_result"},  # (first_result_s: start-up; the last two null before a result)
      "corpus": str | null,              # regression corpus matched against
      "layout_classes": {kind: [class, ...]},   # column order (optional)
      "cells": [{
          "op", "kind", "layout_class",
          "status": "pass" | "fail" | "nonpass" | "unavailable" | "not_run",
          "cases": int, "counts": {verdict: count},
          "reason": str,                 # why unavailable / not run
          "worst": null | {"metric", "err", "allowed", "ratio", "why", "verdict", "case"},
          "examples": {verdict: "cases/NAME.json"},   # one case file per non-pass verdict
          "new": [verdict, ...],         # failing verdicts not in the corpus
          "known": [verdict, ...],       # failing verdicts the corpus lists or a named kernel defect explains
          "kernel_defects": {verdict: str},  # optional: the kernel defect that explains the example case
          "attribution": {verdict: str},     # optional: who faulted, in one line (attribution_text)
          "messages": {verdict: str}     # first message seen per non-pass verdict
      }],
      "unavailable": [{"op", "reason"}],
      "new_failures": [{"op", "layout_class", "verdict", "case", "fingerprint"}],
      "contracts": {op: contract},       # optional: harness.contract.infer_contract per op (also contracts.json)
    }

Cell status: ``pass`` every case passed; ``fail`` some case got a failing
verdict (see :data:`harness.verdicts.BENIGN`); ``nonpass`` only benign
non-pass verdicts (``rejected``: the op refused the layout with a clean error);
``unavailable`` the target cannot run on this device (``reason`` says why);
``not_run`` the cell was not reached (the budget ended, or the run was
interrupted, before it got a result); the reports list these cells as not
reached, never as passing.

Cells with ``unsupported`` cases (the harness could not call a plug-in as the
case needs: a failure of the run, not the op's verdict) are listed first, in a
section "The harness could not run these", before the grids.

Case links are relative to the report's directory, so the whole output
directory can be archived or served as static files.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from harness._jsonfile import atomic_write_text, read_json
from harness.verdicts import format_number

__all__ = [
    "SUMMARY_SCHEMA_VERSION",
    "CELL_STATUSES",
    "SummaryError",
    "validate_summary",
    "load_summary",
    "render_markdown",
    "render_html",
    "write_reports",
    "atomic_write_text",
    "run_state_text",
    "RUN_STATUSES",
    "attribution_text",
]

SUMMARY_SCHEMA_VERSION = 1
CELL_STATUSES = ("pass", "fail", "nonpass", "unavailable", "not_run")
RUN_STATUSES = ("running", "completed", "interrupted", "no_results")
_MAX_SUMMARY_BYTES = 64 * 1024 * 1024

_STATUS_MARK = {"pass": "PASS", "fail": "FAIL", "nonpass": "REJ", "unavailable": "n/a", "not_run": "not reached"}


class SummaryError(ValueError):
    """A summary dict/file does not follow the schema; the message names the field."""


# ---------------------------------------------------------------------------- validation


def _req(d: Mapping[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise SummaryError(f"{where}: missing field {key!r}")
    v = d[key]
    if not isinstance(v, typ) or (typ in (int, float, (int, float)) and isinstance(v, bool)):
        tname = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise SummaryError(f"{where}: field {key!r} must be {tname}, got {type(v).__name__} {v!r:.80}")
    return v


def validate_summary(summary: Any) -> dict[str, Any]:
    """Check ``summary`` against the schema above; returns it unchanged or raises :class:`SummaryError`."""
    if not isinstance(summary, dict):
        raise SummaryError(f"summary must be a JSON object, got {type(summary).__name__}")
    version = summary.get("schema_version")
    if version != SUMMARY_SCHEMA_VERSION:
        raise SummaryError(
            f"summary schema_version {version!r} is not supported; this harness reads {SUMMARY_SCHEMA_VERSION}"
        )
    _req(summary, "device", dict, "summary")
    _req(summary, "duration_s", (int, float), "summary")
    _req(summary, "totals", dict, "summary")
    by_device = summary.get("cases_by_device", {})
    if not isinstance(by_device, dict) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in by_device.values()
    ):
        raise SummaryError(f"summary: cases_by_device must map device -> non-negative int, got {by_device!r:.80}")
    cells = _req(summary, "cells", list, "summary")
    for i, cell in enumerate(cells):
        where = f"cells[{i}]"
        if not isinstance(cell, dict):
            raise SummaryError(f"{where} must be an object")
        for key in ("op", "kind", "layout_class", "status"):
            _req(cell, key, str, where)
        if cell["status"] not in CELL_STATUSES:
            raise SummaryError(f"{where}: status {cell['status']!r} unknown; use one of {CELL_STATUSES}")
        _req(cell, "cases", int, where)
        counts = _req(cell, "counts", dict, where)
        for verdict, n in counts.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise SummaryError(f"{where}: counts[{verdict!r}] must be a non-negative int, got {n!r}")
        examples = cell.get("examples", {})
        if not isinstance(examples, dict) or not all(isinstance(v, str) for v in examples.values()):
            raise SummaryError(f"{where}: examples must map verdict -> relative case path")
        for verdict, path in examples.items():
            if os.path.isabs(path) or ".." in Path(path).parts:
                raise SummaryError(f"{where}: examples[{verdict!r}] = {path!r} must be relative to the report dir")
        worst = cell.get("worst")
        if worst is not None and not isinstance(worst, dict):
            raise SummaryError(f"{where}: worst must be null or an object")
        att = cell.get("attribution", {})
        if not isinstance(att, dict) or not all(isinstance(v, str) for v in att.values()):
            raise SummaryError(f"{where}: attribution must map verdict -> one line of text")
    for key in ("unavailable", "new_failures"):
        if not isinstance(summary.get(key, []), list):
            raise SummaryError(f"summary: {key!r} must be a list")
    if summary.get("status", "completed") not in RUN_STATUSES:
        raise SummaryError(f"summary: status {summary.get('status')!r} unknown; use one of {RUN_STATUSES}")
    warnings = summary.get("warnings", [])
    if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
        raise SummaryError("summary: warnings must be a list of strings")
    if not isinstance(summary.get("interrupted", ""), str):
        raise SummaryError("summary: interrupted must be a string")
    _validate_explore(summary.get("explore", {}))
    return summary


def _validate_explore(ex: Any) -> None:
    """The optional ``explore`` section: ops -> objects whose findings are objects with relative case paths."""
    if not isinstance(ex, dict):
        raise SummaryError("summary: explore must be an object")
    ops = ex.get("ops", {})
    if not isinstance(ops, dict) or not all(isinstance(d, dict) for d in ops.values()):
        raise SummaryError("summary: explore.ops must map op -> object")
    for op, d in ops.items():
        findings = d.get("findings", [])
        if not isinstance(findings, list) or not all(isinstance(f, dict) for f in findings):
            raise SummaryError(f"summary: explore.ops[{op!r}].findings must be a list of objects")
        paths = [f.get("case") for f in findings] + [(d.get("worst") or {}).get("case")]
        for path in paths:
            if path is not None and (not isinstance(path, str) or os.path.isabs(path) or ".." in Path(path).parts):
                raise SummaryError(
                    f"summary: explore.ops[{op!r}] case path {path!r} must be relative to the report dir"
                )
        for f in findings:
            for key in ("verdict", "operand", "property"):
                _req(f, key, str, f"explore.ops[{op!r}].findings")
            _req(f, "count", int, f"explore.ops[{op!r}].findings")
    corpus = ex.get("corpus", [])
    if not isinstance(corpus, list) or not all(
        isinstance(c, dict) and isinstance(c.get("fingerprint"), str) for c in corpus
    ):
        raise SummaryError("summary: explore.corpus must be a list of objects with a fingerprint")


def load_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``summary.json`` (a file or the matrix output directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "summary.json"
    if not p.exists():
        raise SummaryError(f"{p} does not exist; run `python -m harness matrix --out DIR` first")
    data = read_json(p, SummaryError, label=str(p), kind="a matrix summary", max_bytes=_MAX_SUMMARY_BYTES)
    return validate_summary(data)


# ---------------------------------------------------------------------------- helpers


def _num(x: Any) -> str:
    """A metric for a table cell: ``format_number``, with ``-`` for a missing value."""
    return "-" if x is None else format_number(x)


def _ordered_unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for it in items:
        seen.setdefault(it, None)
    return list(seen)


def _grid(summary: Mapping[str, Any]) -> list[tuple[str, list[str], list[str], dict[tuple[str, str], dict]]]:
    """Per op kind: (kind, ops, layout classes, {(op, class): cell}) in first-seen order."""
    out = []
    cells = summary["cells"]
    for kind in _ordered_unique(c["kind"] for c in cells):
        kc = [c for c in cells if c["kind"] == kind]
        ops = _ordered_unique(c["op"] for c in kc)
        seen = _ordered_unique(c["layout_class"] for c in kc)
        canon = [n for n in (summary.get("layout_classes") or {}).get(kind, []) if n in seen]
        classes = canon + [n for n in seen if n not in canon]
        out.append((kind, ops, classes, {(c["op"], c["layout_class"]): c for c in kc}))
    return out


def _nonpass_counts(cell: Mapping[str, Any]) -> list[tuple[str, int]]:
    return sorted(((v, n) for v, n in cell["counts"].items() if v != "pass" and n), key=lambda t: (-t[1], t[0]))


def _cell_text(cell: Mapping[str, Any] | None) -> str:
    """Short text of one grid cell: status and counts (``PASS 12``, ``FAIL drift 3/12``)."""
    if cell is None:
        return ""
    st = cell["status"]
    if st in ("unavailable", "not_run"):
        return _STATUS_MARK[st]
    bad = _nonpass_counts(cell)
    if not bad:
        return f"PASS {cell['cases']}"
    head = ", ".join(f"{v} {n}" for v, n in bad[:2]) + (" ..." if len(bad) > 2 else "")
    return f"{_STATUS_MARK[st]} {head}/{cell['cases']}"


def cudnn_version_text(v: Any) -> str:
    """``torch.backends.cudnn.version()`` as people write it: 91900 -> "9.19.0", 8902 -> "8.9.2"."""
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        if v >= 90000:  # cuDNN 9: major * 10000 + minor * 100 + patch
            return f"{v // 10000}.{v % 10000 // 100}.{v % 100}"
        return f"{v // 1000}.{v % 1000 // 100}.{v % 100}"  # cuDNN 7/8: major * 1000 + minor * 100 + patch
    return _num(v)


def device_text(summary: Mapping[str, Any]) -> str:
    """``cuda: 2 x NVIDIA H200`` -- where a matrix ran."""
    dev = summary.get("device", {})
    return f"{dev.get('used', '?')}: {dev.get('name') or dev.get('device') or '?'}"


def speed_record(results: int, t0: float, first: float | None, end: float) -> dict[str, Any]:
    """``summary["speed"]``: results per second over the case work (start-up included, from ``t0`` to ``end``, the
    end of case work), when the first result came (``first``; None before one), and the pace from then on.  Times
    on one clock: a run's ``time.monotonic()``, or seconds from its start (merged shards)."""
    work = max(end - t0, 1e-9)
    if first is not None:
        first = min(first, end)  # a result counted at the wrap-up (answered while the pool closed) is the end's
    after = end - first if first is not None else None
    return {
        "results": results,
        "case_work_s": round(work, 3),
        "cases_per_s": round(results / work, 2),
        "first_result_s": round(first - t0, 3) if first is not None else None,
        "cases_per_s_after_first_result": round(results / after, 2) if after and after > 0 else None,
    }


def speed_text(summary: Mapping[str, Any]) -> str | None:
    """``31.2 cases/s over 58 s of case work (first result after 17.4 s; 41.0 cases/s from then)``, or None for a
    summary without ``speed`` (older runs, and shards merged from one of them)."""
    sp = summary.get("speed")
    if not isinstance(sp, Mapping) or not isinstance(sp.get("cases_per_s"), (int, float)):
        return None
    text = f"{sp['cases_per_s']:.1f} cases/s over {float(sp.get('case_work_s') or 0):.0f} s of case work"
    first, after = sp.get("first_result_s"), sp.get("cases_per_s_after_first_result")
    if isinstance(first, (int, float)):
        text += f" (first result after {first:.1f} s"
        text += f"; {after:.1f} cases/s from then)" if isinstance(after, (int, float)) else ")"
    return text


def run_state_text(summary: Mapping[str, Any]) -> str | None:
    """One line on how the run ended when it did not simply complete (None when it did)."""
    status = summary.get("status", "completed" if summary.get("completed", True) else "interrupted")
    if status == "running":
        return "RUNNING: partial results, rewritten every few seconds while the run goes"
    if status == "interrupted":
        why = summary.get("interrupted") or "unknown cause"
        return f"INTERRUPTED ({why}): partial results, everything found until then"
    if status == "no_results":
        return "NO RESULTS: no case finished (budget spent during start-up, or no usable target)"
    return None


def _not_reached(summary: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [c for c in summary["cells"] if c["status"] == "not_run"]


def _header_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    dev = summary.get("device", {})
    state = run_state_text(summary)
    rows = [("run", state)] if state else []
    rows += [
        ("device", device_text(summary)),
        ("compute capability", _num(dev.get("capability"))),
        ("torch", _num(dev.get("torch"))),
        ("CUDA", _num(dev.get("cuda"))),
        ("cuDNN", cudnn_version_text(dev.get("cudnn"))),
        ("cuBLAS", _num(dev.get("cublas"))),
        ("driver", _num(dev.get("driver"))),
        ("started", _num(summary.get("started_at"))),
        (
            "duration",
            f"{summary['duration_s']:.1f} s (budget {_num(summary.get('budget_s'))} s"
            f"{', exhausted' if summary.get('budget_exhausted') else ''})",
        ),
        ("cases", ", ".join(f"{v} {n}" for v, n in sorted(summary["totals"].items(), key=lambda t: -t[1])) or "0"),
    ]
    if summary.get("cases_by_device"):
        rows.append(("cases per device", ", ".join(f"{d} {n}" for d, n in summary["cases_by_device"].items())))
    if pace := speed_text(summary):
        rows.append(("speed", pace))
    if summary.get("workers_replaced") is not None:
        rows.append(("workers replaced", str(summary["workers_replaced"])))
    if summary.get("corpus"):
        rows.append(("regression corpus", str(summary["corpus"])))
    if _not_reached(summary):
        rows.append(("not reached", f"{len(_not_reached(summary))} of {len(summary['cells'])} cells (listed below)"))
    if summary.get("warnings"):
        rows.append(("warnings", str(len(summary["warnings"]))))
    if summary.get("command"):
        rows.append(("command", str(summary["command"])))
    return rows


def _nonpass_cells(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [c for c in summary["cells"] if c["status"] in ("fail", "nonpass")]


#: heading of the report's first section: cells with ``unsupported`` cases (a failure of the run, not the op's)
UNSUPPORTED_HEADING = "The harness could not run these"


def _unsupported_cells(summary: Mapping[str, Any]) -> list[tuple[dict[str, Any], int, str]]:
    """(cell, unsupported cases, first message) for every cell with ``unsupported`` cases."""
    return [
        (c, c["counts"]["unsupported"], c.get("messages", {}).get("unsupported", ""))
        for c in summary["cells"]
        if c["counts"].get("unsupported")
    ]


def _worst_text(worst: Mapping[str, Any] | None) -> str:
    if not worst:
        return "-"
    return (
        f"{worst.get('metric', '?')} {_num(worst.get('err'))} vs allowed {_num(worst.get('allowed'))} "
        f"(ratio {_num(worst.get('ratio'))})"
    )


# ---------------------------------------------------------------------------- attribution


def _short_path(path: str) -> str:
    p = str(path).replace("\\", "/")
    for marker in ("site-packages/", "dist-packages/"):
        if marker in p:
            return p.split(marker, 1)[1]
    return "/".join(p.split("/")[-2:])


def _frame_short(frame: str) -> str:
    """``/venv/.../site-packages/pkg/core.py:123 in f: code`` -> ``pkg/core.py:123 f``; other text as is."""
    where, sep, rest = str(frame).partition(" in ")
    if not sep or ":" not in where or not where.rsplit(":", 1)[1].isdigit():
        return str(frame)
    return f"{_short_path(where)} {rest.split(':', 1)[0].strip()}".strip()


def _access_text(acc: Mapping[str, Any]) -> str:
    """``read of 16 B, address misaligned by 2 B, inside a 2097152 B allocation``."""
    bits = []
    if acc.get("kind"):
        bits.append(f"{acc['kind']}" + (f" of {acc['size']} B" if acc.get("size") else ""))
    if acc.get("problem"):
        by = f" by {acc['misaligned_by']} B" if acc.get("misaligned_by") else ""
        bits.append(f"address {acc['problem']}{by}")
    alloc = acc.get("allocation") or {}
    if alloc.get("where") in ("after", "before"):
        bits.append(f"{alloc.get('bytes')} B {alloc['where']} a {alloc.get('size')} B allocation")
    return ", ".join(bits)


def attribution_text(att: Mapping[str, Any] | None) -> str:
    """A device fault's attribution in one line: the faulting kernel (compute-sanitizer) or call, how it was
    named, and where it was launched from; '' when there is nothing to say.

    ``faulting kernel: K (read of 16 B, address misaligned) via compute-sanitizer; launched from
    pkg/core.py:123 per_channel_fp8``."""
    if not isinstance(att, Mapping):
        return ""
    from harness.runner.sanitizer import short_kernel_name

    method = str(att.get("method") or "")
    if att.get("kernel"):
        acc = _access_text(att.get("access") or {})
        text = f"faulting kernel: {short_kernel_name(str(att['kernel']))}" + (f" ({acc})" if acc else "")
        text += " via compute-sanitizer"
    elif att.get("op"):
        text = f"faulting op: {att['op']}" + (f" ({method})" if method else "")
    else:
        return str(att.get("skipped") or "")
    if att.get("launch_frame"):
        text += f"; launched from {_frame_short(str(att['launch_frame']))}"
    if att.get("sanitizer_unusable"):
        text += f" [{att['sanitizer_unusable']}]"
    return text


# ---------------------------------------------------------------------------- markdown


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(summary: Mapping[str, Any]) -> str:
    """The report as GitHub-flavoured Markdown: header, one grid per op kind, then every non-pass cell."""
    validate_summary(dict(summary))
    lines = ["# Layout matrix report", ""]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {k} | {_md_escape(v)} |" for k, v in _header_rows(summary)]
    lines.append("")
    unsupported = _unsupported_cells(summary)
    if unsupported:
        lines += [f"## {UNSUPPORTED_HEADING} ({sum(n for _, n, _ in unsupported)} cases, verdict unsupported)", ""]
        lines += [
            f"- **{c['op']}** × `{c['layout_class']}`: {n} — {_md_escape(msg[:300])}" for c, n, msg in unsupported
        ]
        lines.append("")
    if summary.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {_md_escape(w)}" for w in summary["warnings"]] + [""]
    new = summary.get("new_failures", [])
    if new:
        lines += [f"## New failures ({len(new)}; not in the regression corpus)", ""]
        for f in new:
            sig = f" ({_md_escape(f['signature'])}, {f.get('count', 0)} raw cases)" if f.get("signature") else ""
            lines.append(f"- **{f['op']}** × `{f['layout_class']}`: {f['verdict']}{sig} — [{f['case']}]({f['case']})")
        lines.append("")
    for kind, ops, classes, by in _grid(summary):
        lines += [f"## {kind}", ""]
        lines.append("| op | " + " | ".join(classes) + " |")
        lines.append("|---|" + "---|" * len(classes))
        for op in ops:
            row = []
            for cls in classes:
                cell = by.get((op, cls))
                text = _md_escape(_cell_text(cell))
                ex = _first_example(cell)
                row.append(f"[{text}]({ex})" if ex else text)
            lines.append(f"| {op} | " + " | ".join(row) + " |")
        lines.append("")
    bad = _nonpass_cells(summary)
    if bad:
        lines += ["## Non-pass cells", ""]
        for c in bad:
            tags = []
            if c.get("new"):
                tags.append("NEW: " + ", ".join(c["new"]))
            if c.get("known"):
                tags.append("known: " + ", ".join(c["known"]))
            lines.append(f"### {c['op']} × {c['layout_class']} ({c['status']}{'; ' + '; '.join(tags) if tags else ''})")
            lines.append("")
            for v, why in sorted(c.get("kernel_defects", {}).items()):
                lines.append(f"- kernel defect ({v}): {why}")
            lines.append("- verdicts: " + ", ".join(f"{v} {n}" for v, n in sorted(c["counts"].items())))
            lines.append(f"- worst: {_worst_text(c.get('worst'))}")
            if c.get("worst") and c["worst"].get("why"):
                lines.append(f"- bound: {_md_escape(c['worst']['why'])}")
            for verdict, path in sorted(c.get("examples", {}).items()):
                msg = c.get("messages", {}).get(verdict, "")
                lines.append(f"- {verdict}: [{path}]({path})" + (f" — {_md_escape(msg[:300])}" if msg else ""))
            for verdict, text in sorted(c.get("attribution", {}).items()):
                lines.append(f"- {verdict} attribution: {_md_escape(text)}")
            lines.append("")
    lines += explore_section(summary)
    lines += contracts_section(summary)
    missed = _not_reached(summary)
    if missed:
        lines += [f"## Not reached ({len(missed)} cells; no result, not passing)", ""]
        lines += [f"- {c['op']} × `{c['layout_class']}`" for c in missed]
        lines.append("")
    unavailable = summary.get("unavailable", [])
    if unavailable:
        lines += ["## Unavailable on this device", ""]
        lines += [f"- {u['op']}: {_md_escape(u.get('reason', ''))}" for u in unavailable]
        lines.append("")
    return "\n".join(lines)


def _explore_rows(summary: Mapping[str, Any]) -> tuple[str, list[tuple[str, str, list[tuple[str, str | None]]]], list]:
    """(heading, per op: (op, its line, [(finding text, case path)]), corpus rows) of the exploration."""
    ex = summary.get("explore") or {}
    ops = ex.get("ops") or {}
    head = (
        f"Exploration ({ex.get('cases', 0)} cases in {float(ex.get('seconds') or 0):.0f} s, seed {ex.get('seed')}; "
        "each failure signature once, with its minimal case)"
    )
    rows = []
    for op, d in ops.items():
        if d.get("status") != "done":
            rows.append((op, f"{d.get('status')}: {d.get('reason', '')}", []))
            continue
        verdicts = ", ".join(f"{v} {n}" for v, n in sorted((d.get("verdicts") or {}).items()))
        line = (
            f"{d.get('cases', 0)} cases (+{d.get('minimize_runs', 0)} to minimize; {verdicts}); "
            f"{len(d.get('findings', []))} signature(s); coverage {d.get('coverage', 0)}; stopped: {d.get('stopped')}"
        )
        items: list[tuple[str, str | None]] = []
        for f in sorted(d.get("findings", []), key=lambda f: -int(f.get("count") or 0)):
            tag = (
                f" [known: {f['known']}]" if f.get("known") else (" [kernel defect]" if f.get("kernel_defect") else "")
            )
            att = attribution_text(f.get("attribution"))
            items.append(
                (
                    f"{f['verdict']} ×{f['count']} [{f['operand']}] {f['property']}{tag}" + (f"; {att}" if att else ""),
                    f.get("case"),
                )
            )
        w = d.get("worst")
        if w:
            items.append(
                (f"worst drift ratio {_num(w.get('ratio'))} ({w.get('verdict')}): {w.get('note', '')}", w.get("case"))
            )
        for kind, sk in sorted((d.get("skipped") or {}).items()):
            items.append((f"skipped {sk.get('count')} {kind} draw(s): {sk.get('example')}", None))
        rows.append((op, line, items))
    return head, rows, list(ex.get("corpus") or [])


def explore_section(summary: Mapping[str, Any], html_out: bool = False) -> list[str]:
    """The "Exploration" section (``summary["explore"]``, see :mod:`harness.matrix_explore`); [] when it did not run."""
    ex = summary.get("explore") or {}
    if not ex.get("enabled") or not ex.get("ops"):
        return []
    head, rows, corpus = _explore_rows(summary)
    here = [c for c in corpus if not c.get("skipped")]
    got = sum(1 for c in here if c.get("reproduced"))
    chead = f"Regression corpus reproduced by the exploration: {got}/{len(here)} that apply here"

    def corpus_text(c: Mapping[str, Any]) -> str:
        if c.get("reproduced"):
            return (
                f"{c['fingerprint']}: reproduced after {c.get('after_cases')} cases, {_num(c.get('after_s'))} s "
                f"({c.get('note', '')})"
            )
        if c.get("skipped"):
            return f"{c['fingerprint']}: not tried here: {c['skipped']}"
        return f"{c['fingerprint']}: NOT reproduced ({c.get('family')}, verdict {c.get('verdict')})"

    if not html_out:
        lines = [f"## {head}", ""]
        for op, line, items in rows:
            lines.append(f"- **{_md_escape(op)}**: {_md_escape(line)}")
            for text, path in items:
                lines.append(f"  - {_md_escape(text)}" + (f" — [{path}]({path})" if path else ""))
        lines += ["", f"### {chead}", ""]
        lines += [f"- {_md_escape(corpus_text(c))}" for c in corpus]
        return lines + [""]
    out = [f"<h2>{_h(head)}</h2><ul>"]
    for op, line, items in rows:
        out.append(f"<li><b>{_h(op)}</b>: {_h(line)}<ul>")
        for text, path in items:
            out.append(f"<li>{_h(text)}" + (f" &mdash; <a href='{_h(path)}'>{_h(path)}</a>" if path else "") + "</li>")
        out.append("</ul></li>")
    out.append(f"</ul><h3>{_h(chead)}</h3><ul>")
    out += [f"<li>{_h(corpus_text(c))}</li>" for c in corpus]
    out.append("</ul>")
    return out


def contracts_section(summary: Mapping[str, Any], html_out: bool = False) -> list[str]:
    """The "Layout contracts" section: each op's measured preconditions (``summary["contracts"]``, see
    :mod:`harness.contract`), as Markdown lines or HTML; [] when the summary has none."""
    from harness.contract import env_line, format_contract

    contracts = summary.get("contracts") or {}
    if not isinstance(contracts, Mapping) or not contracts:
        return []
    first = next(iter(contracts.values()))
    head = (
        "Layout contracts (what each op needed in this run; clauses only where the evidence separates; "
        f"measured on {env_line(first.get('measured_on', {}))})"
    )
    if not html_out:
        lines = [f"## {head}", ""]
        for op, c in contracts.items():
            text = format_contract(c)
            lines += [f"- **{_md_escape(op)}**: {_md_escape(text[0].split(': ', 1)[1])}"]
            lines += [f"  - {_md_escape(t.strip())}" for t in text[1:] if not t.strip().startswith("measured on")]
        return lines + [""]
    out = [f"<h2>{_h(head)}</h2><ul>"]
    for op, c in contracts.items():
        text = format_contract(c)
        out.append(f"<li><b>{_h(op)}</b>: {_h(text[0].split(': ', 1)[1])}<ul>")
        out += [f"<li>{_h(t.strip())}</li>" for t in text[1:] if not t.strip().startswith("measured on")]
        out.append("</ul></li>")
    out.append("</ul>")
    return out


def _first_example(cell: Mapping[str, Any] | None) -> str | None:
    if not cell or not cell.get("examples"):
        return None
    ex = cell["examples"]
    bad = [v for v, _ in _nonpass_counts(cell) if v in ex]
    return ex[bad[0]] if bad else next(iter(ex.values()))


# ---------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;color:#1b1b1b}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em} h3{font-size:1em;margin-bottom:.2em}
table{border-collapse:collapse;font-size:12px} th,td{border:1px solid #ccc;padding:3px 6px;vertical-align:top}
table.grid th.cls{writing-mode:vertical-rl;transform:rotate(180deg);white-space:nowrap;font-weight:normal}
table.grid td{text-align:center;white-space:nowrap}
td.pass{background:#d9f2d9} td.fail{background:#f7c6c6} td.nonpass{background:#fbe7b5}
td.unavailable{background:#e6e6e6;color:#777} td.not_run{background:#f6f6f6;color:#aaa}
td.new{outline:3px solid #c00;outline-offset:-3px}
table.hdr td:first-child{font-weight:bold} code{background:#f3f3f3;padding:0 2px}
.small{font-size:11px;color:#555}
"""


def _h(x: Any) -> str:
    return html.escape(str(x), quote=True)


def render_html(summary: Mapping[str, Any]) -> str:
    """The report as one self-contained static HTML page (inline CSS, no scripts, relative links)."""
    validate_summary(dict(summary))
    out = [
        "<!DOCTYPE html>",
        "<html><head><meta charset='utf-8'><title>Layout matrix report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Layout matrix report</h1>",
        "<table class='hdr'>",
    ]
    out += [f"<tr><td>{_h(k)}</td><td>{_h(v)}</td></tr>" for k, v in _header_rows(summary)]
    out.append("</table>")
    unsupported = _unsupported_cells(summary)
    if unsupported:
        out.append(
            f"<h2>{_h(UNSUPPORTED_HEADING)} ({sum(n for _, n, _ in unsupported)} cases, verdict unsupported)</h2><ul>"
        )
        out += [
            f"<li><b>{_h(c['op'])}</b> &times; <code>{_h(c['layout_class'])}</code>: {n} &mdash; {_h(msg[:300])}</li>"
            for c, n, msg in unsupported
        ]
        out.append("</ul>")
    if summary.get("warnings"):
        out.append("<h2>Warnings</h2><ul>")
        out += [f"<li>{_h(w)}</li>" for w in summary["warnings"]]
        out.append("</ul>")
    new = summary.get("new_failures", [])
    if new:
        out.append(f"<h2>New failures ({len(new)}; not in the regression corpus)</h2><ul>")
        for f in new:
            out.append(
                f"<li><b>{_h(f['op'])}</b> &times; <code>{_h(f['layout_class'])}</code>: {_h(f['verdict'])} "
                + (f"({_h(f['signature'])}, {_h(f.get('count', 0))} raw cases) " if f.get("signature") else "")
                + f"&mdash; <a href='{_h(f['case'])}'>{_h(f['case'])}</a></li>"
            )
        out.append("</ul>")
    for kind, ops, classes, by in _grid(summary):
        out.append(f"<h2>{_h(kind)}</h2><table class='grid'><tr><th>op</th>")
        out += [f"<th class='cls'>{_h(c)}</th>" for c in classes]
        out.append("</tr>")
        for op in ops:
            out.append(f"<tr><th>{_h(op)}</th>")
            for cls in classes:
                cell = by.get((op, cls))
                if cell is None:
                    out.append("<td></td>")
                    continue
                klass = cell["status"] + (" new" if cell.get("new") else "")
                title = f"{op} x {cls}: " + ", ".join(f"{v} {n}" for v, n in sorted(cell["counts"].items()))
                if cell.get("reason"):
                    title += f" ({cell['reason']})"
                if cell.get("worst"):
                    title += f"; worst {_worst_text(cell['worst'])}"
                text = _h(_cell_text(cell))
                ex = _first_example(cell)
                if ex and cell["status"] in ("fail", "nonpass"):
                    text = (
                        f"<a href='#{_h(_anchor(op, cls))}'>{text}</a> "
                        f"<a class='small' href='{_h(ex)}' title='example case file'>case</a>"
                    )
                out.append(f"<td class='{_h(klass)}' title='{_h(title)}'>{text}</td>")
            out.append("</tr>")
        out.append("</table>")
    bad = _nonpass_cells(summary)
    if bad:
        out.append("<h2>Non-pass cells</h2>")
        for c in bad:
            tags = []
            if c.get("new"):
                tags.append("<b style='color:#c00'>NEW: " + _h(", ".join(c["new"])) + "</b>")
            if c.get("known"):
                tags.append("known: " + _h(", ".join(c["known"])))
            out.append(
                f"<h3 id='{_h(_anchor(c['op'], c['layout_class']))}'>{_h(c['op'])} &times; "
                f"{_h(c['layout_class'])} <span class='small'>({_h(c['status'])}"
                f"{'; ' + '; '.join(tags) if tags else ''})</span></h3><ul>"
            )
            for v, why in sorted(c.get("kernel_defects", {}).items()):
                out.append(f"<li>kernel defect ({_h(v)}): {_h(why)}</li>")
            out.append("<li>verdicts: " + _h(", ".join(f"{v} {n}" for v, n in sorted(c["counts"].items()))) + "</li>")
            w = c.get("worst")
            out.append(f"<li>worst: {_h(_worst_text(w))}</li>")
            if w and w.get("why"):
                out.append(f"<li>bound: <span class='small'>{_h(w['why'])}</span></li>")
            for verdict, path in sorted(c.get("examples", {}).items()):
                msg = c.get("messages", {}).get(verdict, "")
                out.append(
                    f"<li>{_h(verdict)}: <a href='{_h(path)}'>{_h(path)}</a>"
                    + (f" <span class='small'>{_h(msg[:400])}</span>" if msg else "")
                    + "</li>"
                )
            for verdict, text in sorted(c.get("attribution", {}).items()):
                out.append(f"<li>{_h(verdict)} attribution: {_h(text)}</li>")
            out.append("</ul>")
    out += explore_section(summary, html_out=True)
    out += contracts_section(summary, html_out=True)
    missed = _not_reached(summary)
    if missed:
        out.append(f"<h2>Not reached ({len(missed)} cells; no result, not passing)</h2><ul>")
        out += [f"<li>{_h(c['op'])} &times; <code>{_h(c['layout_class'])}</code></li>" for c in missed]
        out.append("</ul>")
    unavailable = summary.get("unavailable", [])
    if unavailable:
        out.append("<h2>Unavailable on this device</h2><ul>")
        out += [f"<li>{_h(u['op'])}: {_h(u.get('reason', ''))}</li>" for u in unavailable]
        out.append("</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def _plain(x: Any) -> Any:
    """Non-finite floats as the strings "nan"/"inf"/"-inf" (JSON has no NaN); tuples as lists."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _anchor(op: str, cls: str) -> str:
    return "cell-" + "".join(ch if ch.isalnum() else "-" for ch in f"{op}--{cls}")


# ---------------------------------------------------------------------------- files


def write_reports(summary: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``summary.json``, ``report.md`` and ``report.html`` into ``out_dir``; returns their paths.

    Every file is written to a unique temporary name in ``out_dir`` and renamed over the old
    one, so a reader (a dashboard polling the folder, a run interrupted mid-write) only ever
    sees a whole file; the temporary file is removed when the write fails.
    """
    data = validate_summary(json.loads(json.dumps(_plain(summary), allow_nan=False)))  # plain JSON or fail here
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"summary": d / "summary.json", "markdown": d / "report.md", "html": d / "report.html"}
    texts = {
        "summary": json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n",
        "markdown": render_markdown(data) + "\n",
        "html": render_html(data) + "\n",
    }
    for key, path in paths.items():
        atomic_write_text(path, texts[key])
    return paths
