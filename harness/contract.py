"""Layout contracts: each op's empirical preconditions, inferred from the cases the matrix ran.

A *record* is one case, compact and JSON-able (:func:`record_of`): the op, its verdict, its layout
class, per operand the layout facts of the case's :class:`~harness.layouts.LayoutSpec` (pointer
alignment, stride facts, dtype, last-dim size, value recipe), the case's integer parameters, and
which inputs the op wrote.  :func:`infer_contract` is a pure function of records: per operand
*feature* it looks for a boundary that separates failing cases from working ones, and states a
clause only where the evidence separates:

- ``min`` (an ordinal feature must be >= the smallest value that ever worked): every case below
  failed;
- ``max`` (<= the largest value that ever worked): every case above failed;
- ``one_of`` (a categorical feature must take a value seen working): every other value failed.

The violating side of a clause is all failures by construction; the question is whether it is
non-empty and whether the clauses together explain every failure.  Clauses are picked greedily
(the one explaining most unexplained failures first); clauses with exactly the same violating
cases are *confounded* (the evidence cannot tell them apart: q, k and v misaligned together) and
are stated together, naming each other.  Failures no clause explains are reported as "no
separating boundary found", with their counts.  Every clause carries its counts on both sides of
the boundary and the device and versions it was measured on.

Outcomes: ``pass`` and ``input_mutation`` count as *worked* (the mutation check runs before the
output is judged, so an input write says nothing about the layout; it is a clause of its own,
``writes``); ``unavailable`` and ``error`` (the harness itself failed) are left out and counted;
every other verdict is a *failure*.

``writes``: per operand, how many of the cases whose inputs were checked wrote it; when only some
did, the same inference names what separates them (``x`` written only for some value recipes).

``contracts.json`` (:func:`infer_contracts`, :func:`write_contracts`) also keeps the records it was
inferred from (``records``, one compact line per case), so that ``python -m harness merge`` can infer
the contracts of a sharded run from the union of its shards' cases, as one unsharded run would.  When
they would make the file larger than the reader accepts (:data:`MAX_FILE_BYTES`), they are left out
and ``records_omitted`` says so.

CLI: ``python -m harness contract MATRIX_OUT`` prints the contracts; ``--diff OLD NEW`` names every
clause that narrowed (exit 1) or widened (exit 0); bad input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from harness._jsonfile import atomic_write_text

__all__ = [
    "CONTRACTS_SCHEMA_VERSION",
    "MAX_FILE_BYTES",
    "ContractError",
    "FEATURES",
    "operand_facts",
    "record_of",
    "written_inputs",
    "infer_contract",
    "infer_contracts",
    "validate_contracts",
    "validate_records",
    "load_contracts",
    "write_contracts",
    "format_contract",
    "diff_contracts",
    "measured_on",
    "measured_features",
    "clause_line",
    "add_parser",
]

CONTRACTS_SCHEMA_VERSION = 1
CONTRACTS_KIND = "harness.contracts"
CONTRACTS_FILE = "contracts.json"

#: verdicts that say the op worked on the layout (input_mutation: see the module docstring)
WORKED = frozenset({"pass", "input_mutation"})
#: verdicts left out of the inference: the op did not run here, or the harness failed
EXCLUDED = frozenset({"unavailable", "error"})
#: verdicts whose case had its inputs checked for writes (the op returned and the check ran)
WRITES_CHECKED = frozenset({"pass", "input_mutation", "nonfinite", "drift", "layout_noninvariance", "nondeterministic"})
#: largest contracts.json read (and written: past it the records are left out)
MAX_FILE_BYTES = 64 * 1024 * 1024


class ContractError(ValueError):
    """A contracts file/dict is malformed or missing; the message names the problem and the fix."""


@dataclass(frozen=True)
class Feature:
    """One fact a clause can be about: ``name``, ``kinds`` (``min``/``max``/``one_of``), how to say it."""

    name: str
    kinds: tuple[str, ...]
    what: str
    unit: str = ""
    boolean: bool = False


#: per-operand features, in the order clauses are tried (ties go to the earlier one)
FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature("alignment", ("min",), "pointer alignment", " B"),
        Feature("last_stride_one", ("min",), "last-dim stride is 1", boolean=True),
        Feature("no_stride0", ("min",), "no stride-0 (broadcast) dim", boolean=True),
        Feature("stride_alignment", ("min",), "every non-unit stride a multiple of", " B"),
        Feature("ld_dense", ("min",), "leading dim not padded (row stride = row length)", boolean=True),
        Feature("size1_canonical", ("min",), "size-1 dims have their contiguous stride", boolean=True),
        Feature("contiguous", ("min",), "contiguous", boolean=True),
        Feature("dtype", ("one_of",), "dtype"),
        Feature("last_dim", ("one_of", "max", "min"), "last-dim size (head dim / in_features)"),
        Feature("last_dim_multiple", ("min",), "last-dim size a multiple of"),
        Feature("values", ("one_of",), "value recipe"),
    )
}
#: op-level features from each integer case parameter ``p``: ``p`` (min/max) and ``p_multiple`` (min)
_PARAM_KINDS = {"": ("max", "min"), "_multiple": ("min",)}


# ------------------------------------------------------------------------------ records


def _pow2_divisor(n: int, cap: int = 256) -> int:
    """Largest power of two dividing ``n`` (``cap`` for 0)."""
    n = abs(int(n))
    if n == 0:
        return cap
    return min(cap, n & -n)


def operand_facts(spec: Any, values: Any = None) -> dict[str, Any]:
    """The layout facts of one operand from its ``LayoutSpec`` (not from a tensor), JSON-able.

    ``values``: the operand's ``ValueSpec`` (its recipe becomes the ``values`` fact).
    """
    shape, strides, itemsize = tuple(spec.shape), tuple(spec.strides()), spec.itemsize
    big = [(n, s) for n, s in zip(shape, strides) if n > 1]
    nonunit = [s for _, s in big if s not in (0, 1)]
    expected, size1_ok = 1, True
    for n, s in zip(reversed(shape), reversed(strides)):
        if n == 1 and s != expected:
            size1_ok = False
        expected *= max(n, 1)
    ld_dense = True
    if len(shape) >= 2 and shape[-2] > 1:
        ld_dense = strides[-2] == shape[-1] * (strides[-1] if shape[-1] > 1 else 1) or strides[-1] == 0
    facts = {
        "alignment": int(spec.alignment()),
        "last_stride_one": bool(not shape or shape[-1] <= 1 or strides[-1] == 1),
        "no_stride0": not any(s == 0 for _, s in big),
        "stride_alignment": min((_pow2_divisor(s * itemsize) for s in nonunit), default=256),
        "ld_dense": bool(ld_dense),
        "size1_canonical": size1_ok,
        "contiguous": bool(spec.is_contiguous()),
        "dtype": str(spec.dtype),
        "last_dim": int(shape[-1]) if shape else 1,
        "last_dim_multiple": _pow2_divisor(shape[-1]) if shape else 1,
    }
    if values is not None:
        facts["values"] = _recipe(values)
    return facts


def _recipe(vs: Any) -> str:
    params = tuple(getattr(vs, "params", ()) or ())
    kind = str(getattr(vs, "kind", vs))
    return kind + (f"({', '.join(f'{k}={v}' for k, v in params)})" if params else "")


def written_inputs(verdict: str, message: str, mutated_inputs: Sequence[str] | None = None) -> list[str]:
    """Names of the inputs an ``input_mutation`` result says were written ([] otherwise).

    ``mutated_inputs``: the result's ``Result.mutated_inputs`` (the worker's record); a result from before
    that field (empty) is read from its message (``harness.verdicts.mutations_from_message``).
    """
    from harness.verdicts import mutations_from_message

    if verdict != "input_mutation":
        return []
    return sorted(set(mutated_inputs or mutations_from_message(message or "")[0]))


def record_of(case: Any, result: Any) -> dict[str, Any]:
    """One compact record of a case and its result (what :func:`infer_contract` reads)."""
    verdict = getattr(result.verdict, "value", str(result.verdict))
    operands = {}
    for name, spec in case.layouts.items():
        vs = case.values.get(name) if getattr(case, "values", None) else None
        operands[name] = operand_facts(spec, vs if vs is not None else "normal")
    params = {k: int(v) for k, v in (case.params or {}).items() if isinstance(v, int) and not isinstance(v, bool)}
    written = written_inputs(verdict, result.message, getattr(result, "mutated_inputs", None))
    return {
        "op": case.op,
        "verdict": verdict,
        "class": str((case.params or {}).get("layout_class", "")),
        "operands": operands,
        "params": params,
        "written": written,
    }


# ------------------------------------------------------------------------------ inference


def _feature_values(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str | None, str], dict[int, Any]]:
    """(operand or None, feature) -> {record index: value}, in a stable order (operands sorted, then
    :data:`FEATURES` in order; then the params, sorted, each followed by its ``_multiple``).  One pass over the
    records: a matrix run's wrap-up infers from every record it made."""
    cols: dict[tuple[str | None, str], dict[int, Any]] = {}
    params: dict[str, dict[int, int]] = {}
    for i, r in enumerate(records):
        for name, facts in r.get("operands", {}).items():
            for feat, v in facts.items():
                if v is not None and feat in FEATURES:
                    cols.setdefault((name, feat), {})[i] = v
        for p, v in r.get("params", {}).items():
            params.setdefault(p, {})[i] = int(v)
    order = {f: k for k, f in enumerate(FEATURES)}
    table = {key: cols[key] for key in sorted(cols, key=lambda k: (k[0], order[k[1]]))}
    for p in sorted(params):
        col = params[p]
        table[(None, p)] = col
        table[(None, p + "_multiple")] = {i: _pow2_divisor(v) for i, v in col.items()}
    return table


def _kinds(operand: str | None, feat: str) -> tuple[str, ...]:
    if operand is not None:
        return FEATURES[feat].kinds
    return _PARAM_KINDS["_multiple" if feat.endswith("_multiple") else ""]


def _side(idx: Iterable[int], bad: set[int], verdicts: Sequence[str]) -> dict[str, Any]:
    idx = list(idx)
    return {
        "cases": len(idx),
        "failed": sum(1 for i in idx if i in bad),
        "by_verdict": dict(sorted(Counter(verdicts[i] for i in idx if i in bad).items())),
    }


def _describe(operand: str | None, feat: str, kind: str, bound: Any) -> str:
    f = FEATURES.get(feat)
    who = f"{operand} " if operand else ""
    if f is not None and f.boolean:
        return f"{who}{f.what}"
    what = (
        f.what
        if f is not None
        else (f"{feat[: -len('_multiple')]} a multiple of" if feat.endswith("_multiple") else feat)
    )
    unit = f.unit if f is not None else ""
    if kind == "one_of":
        return f"{who}{what} one of {', '.join(map(str, bound))}"
    if what.endswith(" of"):
        return f"{who}{what} {bound}{unit}"
    return f"{who}{what} {'>=' if kind == 'min' else '<='} {bound}{unit}"


Table = Mapping[tuple[str | None, str], dict[int, Any]]  # :func:`_feature_values` of a record list


def _candidates(table: Table, bad: set[int], verdicts: Sequence[str]) -> list[dict]:
    out = []
    for (operand, feat), col in table.items():
        good_vals = [v for i, v in col.items() if i not in bad]
        if not good_vals:
            continue  # nothing worked: no boundary to draw on this feature
        for kind in _kinds(operand, feat):
            if kind == "one_of":
                good = set(good_vals)
                accepted = sorted(good, key=str)
                violating = {i for i, v in col.items() if v not in good}
                bound: Any = accepted
                refused = sorted({col[i] for i in violating}, key=str)
                edge: Any = refused
            else:
                try:
                    bound = min(good_vals) if kind == "min" else max(good_vals)
                    violating = {i for i, v in col.items() if (v < bound if kind == "min" else v > bound)}
                except TypeError:
                    continue
                edge = (max if kind == "min" else min)((col[i] for i in violating), default=None)
            if not violating:
                continue
            if isinstance(bound, bool):
                bound = bool(bound)
            out.append(
                {
                    "key": f"{operand or '*'}:{feat}:{kind}",
                    "operand": operand,
                    "feature": feat,
                    "kind": kind,
                    "bound": bound,
                    "nearest_failing": edge,
                    "_violating": violating,
                    "_satisfying": set(col) - violating,
                    "text": _describe(operand, feat, kind, bound),
                }
            )
    return out


def _select(cands: list[dict], bad: set[int]) -> list[dict]:
    """Greedy cover of the failures; identical violating sets stated together (confounded)."""
    chosen: list[dict] = []
    explained: set[int] = set()
    pool = list(cands)
    while pool:
        best = max(pool, key=lambda c: (len(c["_violating"] - explained), -pool.index(c)))
        if not best["_violating"] - explained:
            break
        group = [c for c in pool if c["_violating"] == best["_violating"]]
        for c in group:
            c["confounded_with"] = [o["key"] for o in group if o is not c]
        chosen += group
        explained |= best["_violating"]
        pool = [c for c in pool if c not in group]
    return chosen


def _infer(
    records: Sequence[Mapping[str, Any]],
    bad: set[int],
    verdicts: Sequence[str],
    env: Mapping[str, Any],
    table: Table | None = None,
) -> tuple[list[dict], set[int]]:
    """``table``: :func:`_feature_values` of ``records`` when the caller has it already."""
    chosen = _select(_candidates(_feature_values(records) if table is None else table, bad, verdicts), bad)
    clauses, explained = [], set()
    for c in chosen:
        explained |= c["_violating"]
    for c in chosen:
        sat = c["_satisfying"]
        others = set().union(*(o["_violating"] for o in chosen if o["_violating"] != c["_violating"]))
        satisfied = _side(sat, bad, verdicts)
        satisfied["explained_by_other_clauses"] = sum(1 for i in sat if i in bad and i in others)
        clauses.append(
            {
                "key": c["key"],
                "operand": c["operand"],
                "feature": c["feature"],
                "kind": c["kind"],
                "bound": c["bound"],
                "nearest_failing": c["nearest_failing"],
                "text": c["text"],
                "satisfied": satisfied,
                "violated": _side(c["_violating"], bad, verdicts),
                "classes_violating": sorted({records[i].get("class", "") for i in c["_violating"]}),
                "confounded_with": c.get("confounded_with", []),
                "measured_on": dict(env),
            }
        )
    return clauses, explained


def _observed(table: Table, bad: set[int]) -> dict[str, list]:
    """Per feature key ``operand:feature``: ``[value, worked, failed]`` for each value seen."""
    out: dict[str, list] = {}
    for (operand, feat), col in table.items():
        counts: dict[Any, list[int]] = {}
        for i, v in col.items():
            counts.setdefault(v, [0, 0])[1 if i in bad else 0] += 1
        out[f"{operand or '*'}:{feat}"] = [
            [v, ok, no] for v, (ok, no) in sorted(counts.items(), key=lambda kv: str(kv[0]))
        ]
    return out


def infer_contract(
    records: Sequence[Mapping[str, Any]], op: str | None = None, env: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The contract of one op from its records (pure; see the module docstring for the rules).

    ``op``: keep only records of this op (None: all records, which must be of one op).
    ``env``: where they were measured (:func:`measured_on`); copied into every clause.
    """
    recs = [r for r in records if op is None or r.get("op") == op]
    ops = sorted({r.get("op", "") for r in recs})
    if op is None and len(ops) > 1:
        raise ContractError(f"records of several ops {ops}: pass op= or use infer_contracts")
    name = op if op is not None else (ops[0] if ops else "")
    env = dict(env or {})
    excluded = Counter(r["verdict"] for r in recs if r["verdict"] in EXCLUDED)
    counted = [r for r in recs if r["verdict"] not in EXCLUDED]
    verdicts = [r["verdict"] for r in counted]
    bad = {i for i, v in enumerate(verdicts) if v not in WORKED}
    table = _feature_values(counted)
    clauses, explained = _infer(counted, bad, verdicts, env, table)
    left = sorted(bad - explained)
    unexplained = {
        "failures": len(left),
        "by_verdict": dict(sorted(Counter(verdicts[i] for i in left).items())),
        "classes": sorted({counted[i].get("class", "") for i in left}),
    }
    return {
        "op": name,
        "records": len(recs),
        "counted": len(counted),
        "worked": len(counted) - len(bad),
        "failed": len(bad),
        "by_verdict": dict(sorted(Counter(verdicts).items())),
        "excluded": dict(sorted(excluded.items())),
        "preconditions": clauses,
        "unexplained": unexplained,
        "writes": _writes(counted, env),
        "observed": _observed(table, bad),
        "measured_on": env,
    }


def _writes(counted: Sequence[Mapping[str, Any]], env: Mapping[str, Any]) -> list[dict[str, Any]]:
    checked = [r for r in counted if r["verdict"] in WRITES_CHECKED]
    names = sorted({n for r in checked for n in r.get("operands", {})})
    out = []
    for n in names:
        sub = [r for r in checked if n in r.get("operands", {})]
        wrote = {i for i, r in enumerate(sub) if n in r.get("written", [])}
        if not wrote:
            continue
        entry: dict[str, Any] = {
            "operand": n,
            "written": len(wrote),
            "checked": len(sub),
            "always": len(wrote) == len(sub),
            "when": [],
            "measured_on": dict(env),
        }
        if not entry["always"]:
            labels = ["written" if i in wrote else "untouched" for i in range(len(sub))]
            clauses, explained = _infer(sub, wrote, labels, env)
            entry["when"] = [
                {
                    "key": c["key"],
                    "kind": c["kind"],
                    "text": c["text"],
                    "values": c["nearest_failing"],
                    "violated": c["violated"],
                    "satisfied": c["satisfied"],
                }
                for c in clauses
            ]
            entry["unexplained"] = len(wrote - explained)
        out.append(entry)
    return out


def infer_contracts(
    records: Sequence[Mapping[str, Any]], env: Mapping[str, Any] | None = None, source: str = ""
) -> dict[str, Any]:
    """The contracts document (``contracts.json``): one contract per op in ``records``, and the records."""
    ops = sorted({r.get("op", "") for r in records})
    return {
        "schema_version": CONTRACTS_SCHEMA_VERSION,
        "kind": CONTRACTS_KIND,
        "source": source,
        "measured_on": dict(env or {}),
        "contracts": {op: infer_contract(records, op, env) for op in ops},
        "records": [dict(r) for r in records],
    }


def measured_features(contract: Mapping[str, Any], operand: str) -> set[str]:
    """The features of ``operand`` the contract's evidence covers: its ``measured_features`` entry
    when it has one (shipped contracts, assembled from aggregate findings), else what ``observed`` holds."""
    declared = contract.get("measured_features")
    if isinstance(declared, Mapping):
        return set(declared.get(operand, ()))
    return {k.split(":", 1)[1] for k in contract.get("observed", {}) if k.split(":", 1)[0] == operand}


def measured_on(env: Mapping[str, Any]) -> dict[str, Any]:
    """Device and versions worth citing, from a matrix summary's ``device`` / ``harness env`` dict."""
    keys = (
        "used",
        "device",
        "name",
        "capability",
        "torch",
        "cuda",
        "cudnn",
        "cublas",
        "triton",
        "driver",
        "sageattention",
        "flash_attn",
    )
    return {k: env[k] for k in keys if env.get(k) not in (None, "")}


# ------------------------------------------------------------------------------ files


def validate_contracts(doc: Any, where: str = "contracts") -> dict[str, Any]:
    """Check the document's shape; returns it or raises :class:`ContractError` naming the field."""
    if not isinstance(doc, dict) or doc.get("kind") != CONTRACTS_KIND:
        raise ContractError(f"{where} is not a contracts document (kind {CONTRACTS_KIND!r} expected)")
    if doc.get("schema_version") != CONTRACTS_SCHEMA_VERSION:
        raise ContractError(
            f"{where}: schema_version {doc.get('schema_version')!r} is not supported; "
            f"this harness reads {CONTRACTS_SCHEMA_VERSION}"
        )
    if not isinstance(doc.get("contracts"), dict):
        raise ContractError(f"{where}: field 'contracts' must map op -> contract")
    for op, c in doc["contracts"].items():
        if not isinstance(c, dict):
            raise ContractError(f"{where}: contract of {op!r} must be an object")
        for key, typ in (("preconditions", list), ("writes", list), ("observed", dict), ("unexplained", dict)):
            if not isinstance(c.get(key), typ):
                raise ContractError(f"{where}: contract of {op!r}: field {key!r} must be {typ.__name__}")
        for i, cl in enumerate(c["preconditions"]):
            if not isinstance(cl, dict) or not all(
                k in cl for k in ("key", "kind", "bound", "text", "satisfied", "violated")
            ):
                raise ContractError(
                    f"{where}: contract of {op!r}: preconditions[{i}] lacks key/kind/bound/text/satisfied/violated"
                )
            if cl["kind"] not in ("min", "max", "one_of"):
                raise ContractError(f"{where}: contract of {op!r}: preconditions[{i}] kind {cl['kind']!r} unknown")
    if "records" in doc:
        validate_records(doc["records"], where)
    return doc


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_records(records: Any, where: str = "contracts") -> list[dict[str, Any]]:
    """Check a ``records`` list (:func:`record_of` entries) so that inference cannot trip on it; returns it
    or raises :class:`ContractError` naming the first bad record and field."""
    if not isinstance(records, list):
        raise ContractError(f"{where}: field 'records' must be a list of case records")
    for i, r in enumerate(records):
        bad = None
        if not isinstance(r, dict):
            bad = "is not an object"
        elif not all(isinstance(r.get(k), str) for k in ("op", "verdict", "class")):
            bad = "needs string fields op, verdict, class"
        elif not isinstance(r.get("operands"), dict) or not all(
            isinstance(n, str) and isinstance(f, dict) and all(_scalar(x) for x in f.values())
            for n, f in r["operands"].items()
        ):
            bad = "field 'operands' must map operand -> {feature: number, string or bool}"
        elif not isinstance(r.get("params"), dict) or not all(_int(x) for x in r["params"].values()):
            bad = "field 'params' must map name -> integer"
        elif not isinstance(r.get("written"), list) or not all(isinstance(x, str) for x in r["written"]):
            bad = "field 'written' must be a list of operand names"
        if bad:
            raise ContractError(f"{where}: records[{i}] {bad}; rerun `python -m harness matrix` to write it again")
    return records


def load_contracts(path: str | Path) -> dict[str, Any]:
    """A contracts document from a matrix output folder (its ``contracts.json``) or a contracts file."""
    from harness._jsonfile import read_json

    p = Path(path)
    if p.is_dir():
        p = p / CONTRACTS_FILE
        if not p.is_file():
            raise ContractError(
                f"{path}: no {CONTRACTS_FILE} in this folder; run `python -m harness matrix --out "
                f"{path}` first, or pass a contracts.json"
            )
    elif not p.is_file():
        raise ContractError(f"{path}: no such file or folder; pass a matrix output folder or a contracts.json")
    try:
        doc = read_json(p, ContractError, label=str(p), kind="a contracts file", max_bytes=MAX_FILE_BYTES)
    except OSError as e:
        raise ContractError(f"{p}: cannot read: {e.strerror or e}") from None
    return validate_contracts(doc, str(p))


def _encode(doc: Mapping[str, Any]) -> str:
    """``doc`` as JSON text: indented, except ``records``, which come last, one compact line each."""
    head = json.dumps({k: v for k, v in doc.items() if k != "records"}, indent=1, sort_keys=True, allow_nan=False)
    if "records" not in doc:
        return head + "\n"
    lines = ",\n".join(json.dumps(r, sort_keys=True, separators=(",", ":"), allow_nan=False) for r in doc["records"])
    return head[:-2] + ',\n "records": [' + (f"\n{lines}\n ]" if lines else "]") + "\n}\n"


def write_contracts(out_dir: str | Path, doc: Mapping[str, Any]) -> Path:
    """Write the document ``doc`` (:func:`infer_contracts`) as ``out_dir/contracts.json`` (temporary
    name, then rename); returns its path.  Records that would make the file larger than
    :data:`MAX_FILE_BYTES` are left out (``records_omitted`` says how many and why)."""
    validate_contracts(doc)
    text = _encode(doc)
    if len(text.encode("utf-8")) > MAX_FILE_BYTES and "records" in doc:
        n = len(doc["records"])
        doc = {k: v for k, v in doc.items() if k != "records"}
        doc["records_omitted"] = (
            f"{n} case records left out: with them the file would exceed {MAX_FILE_BYTES} "
            "bytes; `harness merge` cannot re-infer these contracts across shards"
        )
        text = _encode(doc)
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / CONTRACTS_FILE
    atomic_write_text(path, text)
    return path


# ------------------------------------------------------------------------------ text


def _counts(side: Mapping[str, Any]) -> str:
    v = ", ".join(f"{k} {n}" for k, n in side.get("by_verdict", {}).items())
    return f"{side.get('failed', 0)} failed in {side.get('cases', 0)} cases" + (f" ({v})" if v else "")


def clause_line(cl: Mapping[str, Any]) -> str:
    """One clause with its evidence on both sides of the boundary."""
    sat, vio = cl["satisfied"], cl["violated"]
    extra = sat.get("explained_by_other_clauses", 0)
    line = f"{cl['text']}: violated -> {_counts(vio)}; satisfied -> {_counts(sat)}" + (
        f", {extra} of them violating another clause" if extra else ""
    )
    feat = FEATURES.get(cl.get("feature", ""))
    if cl.get("nearest_failing") not in (None, []) and cl["kind"] != "one_of" and not (feat and feat.boolean):
        line += f"; nearest failing value {cl['nearest_failing']}"
    if cl.get("confounded_with"):
        line += f"; confounded with {', '.join(cl['confounded_with'])} (same cases)"
    return line


def env_line(env: Mapping[str, Any]) -> str:
    """``device ...; torch ...`` for a contract's ``measured_on``."""
    return "; ".join(f"{k} {v}" for k, v in env.items()) or "device and versions not recorded"


def format_contract(c: Mapping[str, Any]) -> list[str]:
    """A contract as readable lines (also the report's text)."""
    verdicts = ", ".join(f"{k} {n}" for k, n in c.get("by_verdict", {}).items())
    lines = [
        f"{c['op']}: {c['counted']} cases ({verdicts or 'none'})"
        + (f"; left out: {', '.join(f'{k} {n}' for k, n in c['excluded'].items())}" if c.get("excluded") else "")
    ]
    for cl in c["preconditions"]:
        lines.append(f"  needs {clause_line(cl)}")
    if not c["preconditions"] and not c["unexplained"].get("failures"):
        lines.append("  no precondition found: no case failed")
    un = c["unexplained"]
    if un.get("failures"):
        lines.append(
            f"  no separating boundary found for {un['failures']} failure(s) ("
            + ", ".join(f"{k} {n}" for k, n in un["by_verdict"].items())
            + f"; classes {', '.join(un['classes'])})"
        )
    for w in c["writes"]:
        head = f"  writes {w['operand']}: in {w['written']} of {w['checked']} checked cases"
        if w["always"]:
            lines.append(head + " (always)")
            continue
        if not w["when"]:
            lines.append(head + ": no separating boundary found")
        for x in w["when"]:
            where = (
                f"{x['key'].split(':')[0]} {FEATURES[x['key'].split(':')[1]].what} in {x.get('values')}"
                if x.get("kind") == "one_of" and x["key"].split(":")[1] in FEATURES
                else f"not ({x['text']}), nearest {x.get('values')}"
            )
            lines.append(
                head + f": only where {where}: written in {x['violated']['failed']} of "
                f"{x['violated']['cases']}; elsewhere {x['satisfied']['failed']} of {x['satisfied']['cases']}"
            )
    if c.get("measured_on"):
        lines.append(f"  measured on: {env_line(c['measured_on'])}")
    return lines


# ------------------------------------------------------------------------------ diff


def _violates(kind: str, bound: Any, value: Any) -> bool:
    try:
        if kind == "min":
            return value < bound
        if kind == "max":
            return value > bound
    except TypeError:
        return False
    return value not in bound


def diff_contracts(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every clause that narrowed or widened between two contracts documents, one entry each.

    ``change``: ``narrowed`` (NEW refuses what OLD was seen to accept: a regression), ``widened``
    (NEW accepts what OLD was seen to refuse), or ``new_evidence`` / ``no_evidence`` (a clause only
    one side could state because only it measured the values involved: neither).  A bound that moved
    without such evidence (inside the gap between the nearest failing and the smallest working
    value neither run measured) is no change.
    """
    out: list[dict[str, Any]] = []
    oc, nc = old.get("contracts", {}), new.get("contracts", {})
    for op in sorted(set(oc) & set(nc)):
        o, n = oc[op], nc[op]
        ocl = {c["key"]: c for c in o["preconditions"]}
        ncl = {c["key"]: c for c in n["preconditions"]}
        for key in sorted(set(ocl) | set(ncl)):
            out += _diff_clause(op, key, ocl.get(key), ncl.get(key), o, n)
        ow = {w["operand"]: w for w in o["writes"]}
        nw = {w["operand"]: w for w in n["writes"]}
        for name in sorted(set(ow) | set(nw)):
            a, b = ow.get(name), nw.get(name)
            if a is None and b is not None:
                out.append(
                    _entry(
                        op,
                        f"{name}:writes",
                        "narrowed",
                        f"writes {name}",
                        "not written",
                        f"written in {b['written']} of {b['checked']} cases",
                    )
                )
            elif b is None and a is not None:
                out.append(
                    _entry(
                        op,
                        f"{name}:writes",
                        "widened",
                        f"writes {name}",
                        f"written in {a['written']} of {a['checked']} cases",
                        "not written",
                    )
                )
            elif a["always"] != b["always"]:
                change = "narrowed" if b["always"] else "widened"
                out.append(
                    _entry(
                        op,
                        f"{name}:writes",
                        change,
                        f"writes {name}",
                        f"written in {a['written']} of {a['checked']} cases",
                        f"written in {b['written']} of {b['checked']} cases",
                    )
                )
    return out


def _entry(op: str, key: str, change: str, what: str, old: str, new: str) -> dict[str, Any]:
    return {"op": op, "key": key, "change": change, "what": what, "old": old, "new": new}


def _evidence(c: Mapping[str, Any] | None, contract: Mapping[str, Any], feat_key: str, kind: str, bound: Any) -> str:
    if c is not None:
        return f"{c['text']} (violated: {_counts(c['violated'])}; satisfied: {_counts(c['satisfied'])})"
    seen = contract.get("observed", {}).get(feat_key, [])
    ok = sum(w for v, w, _ in seen if _violates(kind, bound, v))
    fail = sum(f for v, _, f in seen if _violates(kind, bound, v))
    return f"no clause; values beyond that boundary: {ok} worked, {fail} failed"


def _diff_clause(
    op: str,
    key: str,
    a: Mapping[str, Any] | None,
    b: Mapping[str, Any] | None,
    o: Mapping[str, Any],
    n: Mapping[str, Any],
) -> list[dict[str, Any]]:
    feat_key, kind = key.rsplit(":", 1)
    if a is not None and b is not None:
        if kind == "one_of":
            lost = [v for v in a["bound"] if v not in b["bound"] and _seen_failing(n, feat_key, v)]
            gained = [v for v in b["bound"] if v not in a["bound"] and _seen_failing(o, feat_key, v)]
            res = []
            if lost:
                res.append(
                    _entry(
                        op,
                        key,
                        "narrowed",
                        b["text"],
                        _evidence(a, o, feat_key, kind, a["bound"]),
                        _evidence(b, n, feat_key, kind, b["bound"]) + f"; no longer accepted: {lost}",
                    )
                )
            if gained:
                res.append(
                    _entry(
                        op,
                        key,
                        "widened",
                        b["text"],
                        _evidence(a, o, feat_key, kind, a["bound"]),
                        _evidence(b, n, feat_key, kind, b["bound"]) + f"; now accepted: {gained}",
                    )
                )
            return res
        # a change needs evidence: NEW failing at a value OLD saw working (narrowed), or NEW working at a
        # value OLD saw failing (widened); a bound that moved inside the unmeasured gap is no change
        bn, an = b.get("nearest_failing"), a.get("nearest_failing")
        try:
            narrowed = bn is not None and (bn >= a["bound"] if kind == "min" else bn <= a["bound"])
            widened = an is not None and (b["bound"] <= an if kind == "min" else b["bound"] >= an)
        except TypeError:
            return []
        return [
            _entry(
                op,
                key,
                change,
                b["text"],
                _evidence(a, o, feat_key, kind, a["bound"]),
                _evidence(b, n, feat_key, kind, b["bound"]),
            )
            for change, hit in (("narrowed", narrowed), ("widened", widened))
            if hit
        ]
    c = b if b is not None else a
    other = o if b is not None else n
    seen = other.get("observed", {}).get(feat_key, [])
    beyond_worked = sum(w for v, w, _ in seen if _violates(kind, c["bound"], v))
    if b is not None:
        change = "narrowed" if beyond_worked else "new_evidence"
        return [
            _entry(
                op,
                key,
                change,
                b["text"],
                _evidence(None, o, feat_key, kind, b["bound"]),
                _evidence(b, n, feat_key, kind, b["bound"]),
            )
        ]
    change = "widened" if beyond_worked else "no_evidence"
    return [
        _entry(
            op,
            key,
            change,
            a["text"],
            _evidence(a, o, feat_key, kind, a["bound"]),
            _evidence(None, n, feat_key, kind, a["bound"]),
        )
    ]


def _seen_failing(contract: Mapping[str, Any], feat_key: str, value: Any) -> bool:
    return any(v == value and f > 0 for v, _, f in contract.get("observed", {}).get(feat_key, []))


# ------------------------------------------------------------------------------ CLI


def _cmd(args: argparse.Namespace) -> int:
    try:
        if args.diff:
            if len(args.paths) != 2:
                raise ContractError("--diff needs two paths: OLD NEW (matrix output folders or contracts.json)")
            old, new = (load_contracts(p) for p in args.paths)
            changes = diff_contracts(old, new)
            for ch in changes:
                print(
                    f"{ch['change'].upper():<12} {ch['op']}  {ch['key']}: {ch['what']}  | OLD: {ch['old']}  "
                    f"| NEW: {ch['new']}"
                )
            narrowed = sum(1 for ch in changes if ch["change"] == "narrowed")
            widened = sum(1 for ch in changes if ch["change"] == "widened")
            print(
                f"contract diff: {narrowed} narrowed, {widened} widened, "
                f"{len(changes) - narrowed - widened} with evidence on one side only"
            )
            return 1 if narrowed else 0
        if len(args.paths) != 1:
            raise ContractError("give one matrix output folder or contracts.json (or --diff OLD NEW)")
        doc = load_contracts(args.paths[0])
    except ContractError as e:
        print(f"harness contract: {e}", file=sys.stderr)
        return 2
    ops = [o for o in doc["contracts"] if not args.op or o in args.op]
    if args.op and not ops:
        print(f"harness contract: no contract for {args.op}; known: {', '.join(doc['contracts'])}", file=sys.stderr)
        return 2
    print(
        f"layout contracts ({doc.get('source') or 'unknown source'}; measured on "
        f"{env_line(doc.get('measured_on', {}))})"
    )
    for op in ops:
        print("\n".join(format_contract(doc["contracts"][op])))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``contract`` (print the contracts of a matrix run, or diff two)."""
    p = subparsers.add_parser(
        "contract",
        help="print each op's measured layout contract; --diff OLD NEW",
        description="Print the layout contracts a matrix run inferred (its contracts.json), "
        "or name every clause that narrowed (exit 1) or widened between two.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="matrix output folder or contracts.json (two with --diff)")
    p.add_argument("--diff", action="store_true", help="compare OLD NEW; exit 1 when a clause narrowed")
    p.add_argument("--op", action="append", metavar="NAME", help="only these ops (repeatable)")
    p.set_defaults(func=_cmd)
