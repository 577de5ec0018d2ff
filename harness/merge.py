"""``python -m harness merge OUT1 OUT2 ... --out MERGED``: one report from the outputs of a sharded matrix run.

Each input is the ``--out`` directory of ``python -m harness matrix --shard I/N``.  The merge checks
that the shards belong to one run -- the same harness version, the same torch / CUDA / cuDNN /
cuBLAS / Triton / SageAttention versions, device kind and compute capability, the same case set
(``--size``, ``--seed``), the same N and the same cell list -- that every cell sits in the shard its
hash names, that no shard is given twice and none is missing (``--allow-missing`` merges anyway:
the missing shards' cells become ``not_run`` and the merged run is not complete).  It writes
``MERGED/summary.json``, ``report.md``, ``report.html``, ``cases/`` (every shard's example cases;
a name taken by another shard gets a ``shardIofN-`` prefix) and ``contracts.json`` when the shards
have one.  The layout contracts are inferred again (:func:`harness.contract.infer_contracts`) from
the union of the shards' case records (their ``contracts.json`` ``records``), so an op whose cells
ran on several shards gets the contract one unsharded run would give; they are also the merged
summary's ``contracts`` (the reports' "Layout contracts" section).  Shards written by a harness that
kept no records: the merge still merges, keeps the contracts of ops whose cells all ran on one
shard (exact), and leaves out the others, listing them under ``partial`` (summary:
``contracts_partial``) with the reason, which the CLI and the reports say.  The merged
summary lists, under ``merged_from``, which device ran which shard (also a table in the reports);
each merged cell carries its ``shard``.

Exit status: 0 merged; 1 with ``--fail-on-new`` when the merged run has a new failure; 2 bad input
(one line on stderr; nothing written); 3 merged, but the run is not complete (a shard did not
complete, or shards are missing).  ``--out`` must not exist or be empty: a merge never overwrites.
"""

from __future__ import annotations

import argparse
import collections
import html
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.contract import (
    ContractError,
    infer_contracts,
    load_contracts,
    write_contracts,
)
from harness.report import SummaryError, load_summary, speed_record, write_reports
from harness.shard import cell_key, shard_of

__all__ = [
    "MergeError",
    "ShardOutput",
    "add_parser",
    "load_shard_output",
    "merge",
    "merge_contracts",
    "merge_summaries",
]

#: device fields that must agree between shards (library versions and the kind of device)
SAME_DEVICE_FIELDS = (
    "torch",
    "cuda",
    "hip",
    "cudnn",
    "cublas",
    "triton",
    "sageattention",
    "flash_attn",
    "used",
    "capability",
)
#: top-level summary fields that must agree between shards
SAME_RUN_FIELDS = ("schema_version", "kind", "size", "seed")
#: top-level fields the merge computes itself; any other field is kept when every shard agrees on it
_COMPUTED = {
    "started_at",
    "duration_s",
    "wrapup_s",
    "budget_s",
    "budget_exhausted",
    "completed",
    "command",
    "workers",
    "device",
    "totals",
    "cases_by_device",
    "workers_replaced",
    "cells",
    "unavailable",
    "new_failures",
    "shard",
    "corpus",
    "known_failures",
    "layout_classes",
    "interrupted",
    "contracts",
    "contracts_partial",
    "contracts_partial_reason",
}


class MergeError(ValueError):
    """The inputs cannot be merged as asked; the message names the input and the fix."""


@dataclass
class ShardOutput:
    """One shard's output directory, read and validated."""

    path: Path
    summary: dict[str, Any]
    index: int
    count: int
    contracts: dict[str, Any] | None

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"


def load_shard_output(path: str | os.PathLike) -> ShardOutput:
    """Read ``path/summary.json`` (and ``contracts.json`` if present) of a ``matrix --shard`` run."""
    p = Path(path)
    if not p.is_dir():
        raise MergeError(f"{p} is not a directory; give the --out directories of `matrix --shard I/N` runs")
    try:
        summary = load_summary(p)
    except SummaryError as e:
        raise MergeError(str(e)) from None
    rec = summary.get("shard")
    if not isinstance(rec, dict):
        raise MergeError(f"{p}/summary.json has no shard record; it was not written by `matrix --shard I/N`")
    idx, n, cells = rec.get("index"), rec.get("count"), rec.get("all_cells")
    if not (
        isinstance(n, int)
        and isinstance(idx, int)
        and 1 <= idx <= n
        and isinstance(cells, list)
        and all(isinstance(c, list) and len(c) == 2 and all(isinstance(x, str) for x in c) for c in cells)
    ):
        raise MergeError(f"{p}/summary.json: malformed shard record (need index, count, all_cells)")
    contracts = None
    if (p / "contracts.json").exists():
        try:
            contracts = load_contracts(p)
        except ContractError as e:
            raise MergeError(str(e)) from None
    return ShardOutput(p, summary, idx, n, contracts)


def _check(outputs: Sequence[ShardOutput], allow_missing: bool) -> list[int]:
    """Raise :class:`MergeError` unless the outputs are shards of one run; returns the missing indices."""
    if not outputs:
        raise MergeError("no shard outputs given; e.g. python -m harness merge out-1 out-2 --out merged")
    first = outputs[0]
    rec0 = first.summary["shard"]
    for o in outputs[1:]:
        rec = o.summary["shard"]
        if o.count != first.count:
            raise MergeError(
                f"{first.path} is shard {first.label} but {o.path} is shard {o.label}: "
                "merge the shards of one run (the same N)"
            )
        if rec.get("harness") != rec0.get("harness"):
            raise MergeError(
                f"{o.path} was written by harness {rec.get('harness')} and {first.path} by "
                f"{rec0.get('harness')}: rerun the shards with one version"
            )
        for key in SAME_RUN_FIELDS:
            if o.summary.get(key) != first.summary.get(key):
                raise MergeError(
                    f"{o.path} has {key} {o.summary.get(key)!r} but {first.path} has "
                    f"{first.summary.get(key)!r}: shards of one run use the same {key}"
                )
        for key in SAME_DEVICE_FIELDS:
            a, b = first.summary["device"].get(key), o.summary["device"].get(key)
            if a != b:
                raise MergeError(
                    f"{o.path} ran with {key} {b!r} but {first.path} with {a!r}: merge only shards "
                    f"run with the same {key} (one report per device kind and library versions)"
                )
        if rec["all_cells"] != rec0["all_cells"]:
            raise MergeError(
                f"{o.path} and {first.path} come from different cell selections (--ops / --classes / "
                "plug-ins differ): shards of one run use the same selection"
            )
    seen: dict[int, Path] = {}
    for o in outputs:
        if o.index in seen:
            raise MergeError(f"shard {o.label} given twice: {seen[o.index]} and {o.path}")
        seen[o.index] = o.path
        for c in o.summary["cells"]:
            if shard_of(cell_key(c["op"], c["layout_class"]), o.count) != o.index:
                raise MergeError(
                    f"{o.path}: cell {c['op']} x {c['layout_class']} does not belong to shard "
                    f"{o.label}; the output was edited or written by another shard rule"
                )
    missing = [i for i in range(1, first.count + 1) if i not in seen]
    if missing and not allow_missing:
        raise MergeError(
            f"shard(s) {', '.join(f'{i}/{first.count}' for i in missing)} missing; give their "
            "outputs, or --allow-missing to merge without them"
        )
    return missing


def _copy_cases(o: ShardOutput, dest: Path, taken: set[str]) -> dict[str, str]:
    """Copy ``o``'s ``cases/`` into ``dest``; returns renamed relative paths (old -> new)."""
    src = o.path / "cases"
    renamed: dict[str, str] = {}
    if not src.is_dir():
        return renamed
    files = sorted(
        p for p in src.iterdir() if p.is_file() and not p.is_symlink() and p.suffix in (".json", ".safetensors")
    )
    for stem in sorted({p.stem for p in files}):
        new = stem if stem not in taken else f"shard{o.index}of{o.count}-{stem}"
        taken.add(new)
        for p in files:
            if p.stem == stem:
                shutil.copyfile(p, dest / f"{new}{p.suffix}")
                if new != stem:
                    renamed[f"cases/{p.name}"] = f"cases/{new}{p.suffix}"
    return renamed


def _relink(cell: Mapping[str, Any], renamed: Mapping[str, str]) -> dict[str, Any]:
    c = dict(cell)
    c["examples"] = {v: renamed.get(p, p) for v, p in cell.get("examples", {}).items()}
    if isinstance(cell.get("worst"), dict) and cell["worst"].get("case"):
        c["worst"] = dict(cell["worst"], case=renamed.get(cell["worst"]["case"], cell["worst"]["case"]))
    return c


def _merged_speed(outs: Sequence[Any]) -> dict[str, Any]:
    """``speed`` of shards that ran side by side: their results over the longest case work, the latest first
    result; nothing when a shard's summary has no ``speed`` (an older harness)."""
    speeds = [o.summary.get("speed") for o in outs]
    if not speeds or not all(isinstance(sp, dict) and sp.get("case_work_s") for sp in speeds):
        return {}
    results = sum(int(sp.get("results") or 0) for sp in speeds)
    work = max(float(sp["case_work_s"]) for sp in speeds)
    firsts = [sp.get("first_result_s") for sp in speeds if int(sp.get("results") or 0) > 0]  # an empty share: none
    first = max(firsts) if firsts and all(isinstance(f, (int, float)) for f in firsts) else None
    return {"speed": speed_record(results, 0.0, first, work)}  # seconds from the shards' common start


def merge_explore(outs: Sequence[ShardOutput], renamed: Mapping[int, Mapping[str, str]]) -> dict[str, Any]:
    """The shards' ``explore`` sections as one: each op was explored by one shard (its case links follow the
    copied files); a corpus entry is reproduced when any shard reproduced it."""
    sections = [(o, o.summary.get("explore") or {}) for o in outs]
    enabled = [s for _, s in sections if s.get("enabled")]
    if not enabled:
        return {"enabled": False}
    ops: dict[str, Any] = {}
    corpus: dict[str, dict[str, Any]] = {}
    for o, s in sections:
        ren = renamed.get(o.index, {})
        for op, d in (s.get("ops") or {}).items():
            d = dict(d, shard=o.index)
            d["findings"] = [dict(f, case=ren.get(f.get("case") or "", f.get("case"))) for f in d.get("findings", [])]
            if isinstance(d.get("worst"), dict):
                d["worst"] = dict(d["worst"], case=ren.get(d["worst"].get("case") or "", d["worst"].get("case")))
            ops[op] = d
        for c in s.get("corpus") or []:
            have = corpus.get(c["fingerprint"])
            if have is None or (c.get("reproduced") and not have.get("reproduced")):
                corpus[c["fingerprint"]] = dict(c)
            elif not have.get("reproduced") and have.get("skipped") == "op not in this shard's share":
                corpus[c["fingerprint"]] = dict(c)  # the shard that explored the op says why it was not found
    return {
        "enabled": True,
        "status": "done" if all(s.get("status") == "done" for s in enabled) else "running",
        "seed": enabled[0].get("seed"),
        "cases": sum(int(s.get("cases") or 0) for s in enabled),
        "seconds": max(float(s.get("seconds") or 0.0) for s in enabled),
        "ops": dict(sorted(ops.items())),
        "corpus": list(corpus.values()),
    }


def _merged_env(envs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The shards' ``measured_on`` as one: a value every shard shares, else the distinct values joined by ``; ``."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for e in envs for k in e):
        values = list(dict.fromkeys(e[key] for e in envs if key in e))
        out[key] = values[0] if len(values) == 1 else "; ".join(map(str, values))
    return out


def merge_contracts(outputs: Sequence[ShardOutput]) -> dict[str, Any] | None:
    """The merged run's contracts document; None when no shard has a ``contracts.json``.

    Inferred from the union of the shards' records (in the unsharded cell order) with the shards' merged
    ``measured_on``.  When a shard kept no records (an older harness, or ``records_omitted``), only the
    contracts of ops whose cells all ran on one shard are kept; the others are listed under ``partial``
    ({op: [shard, ...]}) and ``partial_reason`` names the shards without records.
    """
    outs = sorted(outputs, key=lambda o: o.index)
    docs = [o.contracts for o in outs if o.contracts is not None]
    if not docs:
        return None
    env = _merged_env([d.get("measured_on") or {} for d in docs])
    source = f"python -m harness merge ({len(outs)} of {outs[0].count} shards of: {docs[0].get('source') or '?'})"
    lacking = [o for o in outs if o.contracts is None or "records" not in o.contracts]
    all_cells = [tuple(c) for c in outs[0].summary["shard"]["all_cells"]]
    if not lacking:
        rank = {cell: i for i, cell in enumerate(all_cells)}
        records = sorted(
            (r for o in outs for r in o.contracts["records"]),  # type: ignore[index]
            key=lambda r: rank.get((r["op"], r["class"]), len(rank)),
        )
        return infer_contracts(records, env, source)
    n = outs[0].count
    shards_of: dict[str, set[int]] = {}
    for op, cls in all_cells:
        shards_of.setdefault(op, set()).add(shard_of(cell_key(op, cls), n))
    kept: dict[str, Any] = {}
    partial: dict[str, list[str]] = {}
    for o in outs:
        for op, c in (o.contracts or {}).get("contracts", {}).items():
            if shards_of.get(op, {o.index}) == {o.index}:
                kept[op] = c
            else:
                partial[op] = [f"{i}/{n}" for i in sorted(shards_of[op])]
    why = (
        f"shard(s) {', '.join(str(o.path) for o in lacking)} kept no case records (written by an older harness, "
        "or too many records); the contracts of ops whose cells ran on several shards cannot be inferred "
        "from them: rerun those shards with this harness to get them"
    )
    doc: dict[str, Any] = {
        "schema_version": docs[0]["schema_version"],
        "kind": docs[0]["kind"],
        "source": source,
        "measured_on": env,
        "contracts": dict(sorted(kept.items())),
    }
    if partial:
        doc["partial"] = dict(sorted(partial.items()))
        doc["partial_reason"] = why
    return doc


def _device_name(outputs: Sequence[ShardOutput]) -> str:
    names = collections.Counter(str(o.summary["device"].get("name") or "?") for o in outputs)
    return "; ".join(f"{name} ({n} shard{'s' if n > 1 else ''})" for name, n in names.items())


def merge_summaries(
    outputs: Sequence[ShardOutput],
    renamed: Mapping[int, Mapping[str, str]] | None = None,
    *,
    missing: Sequence[int] = (),
    command: str = "",
    contracts: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The merged summary (cells in the unsharded run's order); ``renamed``: per shard, moved case paths;
    ``contracts``: the :func:`merge_contracts` document (None: computed here)."""
    renamed = renamed or {}
    if contracts is None:
        contracts = merge_contracts(outputs)
    outs = sorted(outputs, key=lambda o: o.index)
    first = outs[0].summary
    n = outs[0].count
    order = [tuple(c) for c in first["shard"]["all_cells"]]
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    for o in outs:
        for c in o.summary["cells"]:
            by_key[(c["op"], c["layout_class"])] = dict(_relink(c, renamed.get(o.index, {})), shard=o.index)
    kinds = {c["op"]: c["kind"] for c in by_key.values()}
    cells = []
    for op, cls in order:
        if (op, cls) in by_key:
            cells.append(by_key[(op, cls)])
        else:  # only with --allow-missing
            i = shard_of(cell_key(op, cls), n)
            cells.append(
                {
                    "op": op,
                    "kind": kinds.get(op, "?"),
                    "layout_class": cls,
                    "status": "not_run",
                    "cases": 0,
                    "counts": {},
                    "reason": f"shard {i}/{n} missing from the merge",
                    "worst": None,
                    "examples": {},
                    "messages": {},
                    "failing": [],
                    "new": [],
                    "known": [],
                    "kernel_defects": {},
                    "shard": i,
                }
            )
    totals: collections.Counter = collections.Counter()
    by_device: dict[str, int] = {}
    unavailable: dict[str, str] = {}
    new_failures = []
    rank = {k: i for i, k in enumerate(order)}
    for o in outs:
        s = o.summary
        totals.update(s["totals"])
        for dev, k in s.get("cases_by_device", {}).items():
            by_device[f"{o.label} {dev}"] = k
        for u in s.get("unavailable", []):
            unavailable.setdefault(u["op"], u.get("reason", ""))
        ren = renamed.get(o.index, {})
        new_failures += [dict(f, case=ren.get(f.get("case", ""), f.get("case", ""))) for f in s.get("new_failures", [])]
    new_failures.sort(key=lambda f: rank.get((f["op"], f["layout_class"]), len(rank)))
    device = {k: first["device"].get(k) for k in SAME_DEVICE_FIELDS if k in first["device"]}
    device["name"] = _device_name(outs)
    device["devices_used"] = [f"{o.label} {d}" for o in outs for d in o.summary["device"].get("devices_used", [])]
    layout_classes: dict[str, list[str]] = {}
    for o in outs:
        for kind, names in (o.summary.get("layout_classes") or {}).items():
            have = layout_classes.setdefault(kind, [])
            have += [x for x in names if x not in have]
    merged: dict[str, Any] = {
        "schema_version": first["schema_version"],
        "kind": first.get("kind", "harness.matrix.summary"),
        "started_at": min((o.summary.get("started_at") or "" for o in outs), default=""),
        "duration_s": max(float(o.summary["duration_s"]) for o in outs),  # the shards ran side by side
        "budget_s": max(float(o.summary.get("budget_s") or 0.0) for o in outs),
        "budget_exhausted": any(bool(o.summary.get("budget_exhausted")) for o in outs),
        "completed": not missing and all(o.summary.get("completed", True) for o in outs),
        "interrupted": "; ".join(
            f"shard {o.index}: {o.summary['interrupted']}" for o in outs if o.summary.get("interrupted")
        ),
        "command": command,
        "size": first.get("size"),
        "seed": first.get("seed"),
        "workers": sum(int(o.summary.get("workers") or 0) for o in outs),
        "device": device,
        "totals": dict(sorted(totals.items())),
        "cases_by_device": by_device,
        "workers_replaced": sum(int(o.summary.get("workers_replaced") or 0) for o in outs),
        **_merged_speed(outs),
        "corpus": first.get("corpus"),
        "known_failures": first.get("known_failures"),
        "layout_classes": layout_classes,
        "cells": cells,
        "unavailable": [{"op": op, "reason": why} for op, why in sorted(unavailable.items())],
        "new_failures": new_failures,
        "explore": merge_explore(outs, renamed),
        "shards": {
            "count": n,
            "merged": [o.index for o in outs],
            "missing": list(missing),
            "harness": first["shard"].get("harness"),
        },
        "merged_from": [
            {
                "shard": o.label,
                "source": str(o.path),
                "device": o.summary["device"].get("name"),
                "capability": o.summary["device"].get("capability"),
                "driver": o.summary["device"].get("driver"),
                "devices_used": o.summary["device"].get("devices_used", []),
                "started_at": o.summary.get("started_at"),
                "duration_s": o.summary.get("duration_s"),
                "completed": o.summary.get("completed", True),
                "cells": len(o.summary["cells"]),
                "cases": sum(o.summary["totals"].values()),
            }
            for o in outs
        ],
    }
    if contracts is not None:  # the report's "Layout contracts" section
        merged["contracts"] = contracts["contracts"]
        if contracts.get("partial"):
            merged["contracts_partial"] = contracts["partial"]
            merged["contracts_partial_reason"] = contracts["partial_reason"]
    for key in sorted({k for o in outs for k in o.summary} - _COMPUTED - set(merged)):
        values = [o.summary.get(key) for o in outs]
        if all(v == values[0] for v in values):  # a field this merge does not know: kept when the shards agree
            merged[key] = values[0]
    return merged


def _shard_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    return [
        [
            m["shard"],
            str(m["device"]),
            str(m.get("capability") or "-"),
            ", ".join(m.get("devices_used") or []),
            str(m["cells"]),
            str(m["cases"]),
            f"{float(m.get('duration_s') or 0):.0f} s",
            "yes" if m.get("completed", True) else "NO",
            m["source"],
        ]
        for m in summary["merged_from"]
    ]


_SHARD_HEAD = ["shard", "device", "capability", "devices", "cells", "cases", "duration", "completed", "from"]


def _add_shard_tables(summary: Mapping[str, Any], out: Path) -> None:
    """Append "which device ran which shard" to the rendered report.md and report.html."""
    rows = _shard_rows(summary)
    missing = summary["shards"]["missing"]
    n = summary["shards"]["count"]
    md = [
        "",
        f"## Shards ({len(rows)} of {n} merged)",
        "",
        "| " + " | ".join(_SHARD_HEAD) + " |",
        "|" + "---|" * len(_SHARD_HEAD),
    ]
    md += ["| " + " | ".join(x.replace("|", "\\|") for x in r) + " |" for r in rows]
    if missing:
        md += ["", "Missing shards: " + ", ".join(f"{i}/{n}" for i in missing)]
    partial = summary.get("contracts_partial") or {}
    note = (
        f"Layout contracts left out for {', '.join(partial)}: {summary.get('contracts_partial_reason', '')}"
        if partial
        else ""
    )
    if note:
        md += ["", note]
    md_path = out / "report.md"
    md_path.write_text(md_path.read_text() + "\n".join(md) + "\n")
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>" for r in rows)
    table = (
        f"<h2>Shards ({len(rows)} of {n} merged)</h2><table class='hdr'><tr>"
        + "".join(f"<th>{h}</th>" for h in _SHARD_HEAD)
        + f"</tr>{cells}</table>"
        + (f"<p>Missing shards: {html.escape(', '.join(f'{i}/{n}' for i in missing))}</p>" if missing else "")
        + (f"<p>{html.escape(note)}</p>" if note else "")
    )
    html_path = out / "report.html"
    page = html_path.read_text()
    cut = page.rfind("</body>")
    html_path.write_text(page[:cut] + table + "\n" + page[cut:] if cut >= 0 else page + table)


def merge(
    inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *, allow_missing: bool = False, command: str = ""
) -> dict[str, Any]:
    """Check and merge the shard outputs ``inputs`` into the new directory ``out``; returns the merged summary."""
    dest = Path(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise MergeError(
            f"--out {dest} exists and is not an empty directory; a merge never overwrites: give a new directory"
        )
    resolved = [Path(p).resolve() for p in inputs]
    if dest.resolve() in resolved:
        raise MergeError(f"--out {dest} is one of the inputs; give a new directory")
    outputs = [load_shard_output(p) for p in inputs]
    missing = _check(outputs, allow_missing)
    contracts = merge_contracts(outputs)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.merge-{os.getpid()}"
    tmp.mkdir()
    try:
        (tmp / "cases").mkdir()
        taken: set[str] = set()
        renamed = {o.index: _copy_cases(o, tmp / "cases", taken) for o in sorted(outputs, key=lambda o: o.index)}
        summary = merge_summaries(outputs, renamed, missing=missing, command=command, contracts=contracts)
        write_reports(summary, tmp)
        _add_shard_tables(summary, tmp)
        if contracts is not None:
            write_contracts(tmp, contracts)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_summary(dest)


def _cmd(args: argparse.Namespace) -> int:
    command = "python -m harness merge " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []) or [])
    try:
        s = merge(args.inputs, args.out, allow_missing=args.allow_missing, command=command.strip())
    except (MergeError, SummaryError, OSError) as e:
        print(f"harness merge: {e}", file=sys.stderr)
        return 2
    sh = s["shards"]
    gone = ", ".join(f"{i}/{sh['count']}" for i in sh["missing"])
    print(
        f"merged {len(sh['merged'])} of {sh['count']} shards: {len(s['cells'])} cells, "
        f"{sum(s['totals'].values())} cases; {len(s['new_failures'])} new failure(s)"
        + (f"; missing shards {gone}" if gone else "")
    )
    for m in s["merged_from"]:
        print(
            f"  shard {m['shard']}: {m['device']} ({m['cells']} cells, {m['cases']} cases"
            f"{'' if m['completed'] else ', NOT completed'}) from {m['source']}"
        )
    partial = s.get("contracts_partial") or {}
    if partial:
        print(
            f"note: layout contracts left out for {len(partial)} op(s) ({', '.join(partial)}): "
            f"{s.get('contracts_partial_reason', '')}"
        )
    print(f"report: {Path(args.out) / 'report.html'}")
    if not s["completed"]:
        return 3
    if args.fail_on_new and s["new_failures"]:
        return 1
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``merge`` and its options (see the module docstring)."""
    p = subparsers.add_parser(
        "merge",
        help="combine the outputs of `matrix --shard I/N` runs into one report",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("inputs", nargs="+", metavar="OUT", help="the --out directories of the shard runs")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged report's directory (new or empty)")
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="merge even when shards are missing (their cells are not_run; exit 3)",
    )
    p.add_argument("--fail-on-new", action="store_true", help="exit 1 when the merged run has a new failure")
    p.set_defaults(func=_cmd, argv=sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "merge" else [])
