"""Case files: one replayable test case as JSON + safetensors.

A case is two sibling files:

- ``NAME.json``: the schema-versioned description (op and backend, parameters,
  input layouts, value recipes, tolerances, seed, the versions and device it
  ran on, and its verdict);
- ``NAME.safetensors``: the inputs' values as contiguous tensors of their
  logical shapes (optional: without it the values are regenerated from the
  recipes).  The layout is never stored in the tensor file: replay
  re-materializes each input with its ``LayoutSpec``, poison and all.

Loading validates everything and raises :class:`CaseError` naming the field
and the fix.  Nothing is unpickled; ``torch.load`` is never used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from harness._jsonfile import read_json
from harness.layouts import LayoutError, LayoutSpec
from harness.values import ValueError_, ValueSpec

__all__ = ["SCHEMA_VERSION", "Case", "CaseError", "save_case", "load_case", "case_paths", "format_case", "add_parser"]

SCHEMA_VERSION = 1
_MAX_JSON_BYTES = 16 * 1024 * 1024


class CaseError(ValueError):
    """A case file is missing, malformed, or inconsistent with its tensors."""


def _jsonable(x: Any, where: str) -> Any:
    """Reject values JSON cannot carry faithfully (NaN, tensors, sets) with the field's name."""
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)  # "nan" / "inf" survive as strings
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(x)]
    raise CaseError(f"{where} holds a {type(x).__name__}, which a case file cannot store; use JSON types")


@dataclass
class Case:
    """One replayable case.  ``layouts``/``values`` are keyed by input name (e.g. "input", "weight", "q")."""

    op: str
    layouts: dict[str, LayoutSpec] = field(default_factory=dict)
    values: dict[str, ValueSpec] = field(default_factory=dict)
    backend: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    tolerances: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    env: dict[str, Any] = field(default_factory=dict)
    verdict: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.op, str) or not self.op:
            raise CaseError(f"case 'op' must be a non-empty string, got {self.op!r}")
        for name, spec in self.layouts.items():
            if not isinstance(spec, LayoutSpec):
                raise CaseError(f"layouts[{name!r}] must be a LayoutSpec, got {type(spec).__name__}")
        for name, vs in self.values.items():
            if not isinstance(vs, ValueSpec):
                raise CaseError(f"values[{name!r}] must be a ValueSpec, got {type(vs).__name__}")
            if name not in self.layouts:
                raise CaseError(f"values[{name!r}] has no matching layout; layouts are {sorted(self.layouts)}")

    def describe_layouts(self) -> dict[str, str]:
        """``LayoutSpec.describe()`` of every input (a spec that cannot describe itself says why)."""
        out = {}
        for n, spec in self.layouts.items():
            try:
                out[n] = spec.describe()
            except Exception as e:  # noqa: BLE001 - a broken spec is reported, not raised, in a verdict
                out[n] = f"<cannot describe: {e}>"
        return out

    def value_spec(self, name: str) -> ValueSpec:
        """The recipe of input ``name``: its own, else standard normal seeded from the case seed and the
        input's position (what every worker generates, and what a saved case's tensors hold)."""
        if name in self.values:
            return self.values[name]
        i = list(self.layouts).index(name)
        return ValueSpec("normal", seed=(int(self.seed) * 1009 + i) % 2**63)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "op": self.op,
            "backend": self.backend,
            "params": _jsonable(self.params, "params"),
            "layouts": {k: v.to_dict() for k, v in self.layouts.items()},
            "values": {k: v.to_dict() for k, v in self.values.items()},
            "tolerances": _jsonable(self.tolerances, "tolerances"),
            "seed": self.seed,
            "env": _jsonable(self.env, "env"),
            "verdict": _jsonable(self.verdict, "verdict"),
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "case") -> "Case":
        if not isinstance(d, dict):
            raise CaseError(f"{source}: top level must be a JSON object, got {type(d).__name__}")
        version = d.get("schema_version")
        if version is None:
            raise CaseError(f"{source}: missing 'schema_version' (this harness writes {SCHEMA_VERSION})")
        if version != SCHEMA_VERSION:
            raise CaseError(
                f"{source}: schema_version {version!r} is not supported; this harness reads version {SCHEMA_VERSION}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CaseError(f"{source}: unknown fields {sorted(unknown)}; allowed: {sorted(known)}")
        if "op" not in d:
            raise CaseError(f"{source}: missing 'op'")
        for key, typ in (("params", dict), ("layouts", dict), ("values", dict), ("tolerances", dict), ("env", dict),
                         ("verdict", dict), ("backend", str), ("note", str)):
            if key in d and not isinstance(d[key], typ):
                raise CaseError(f"{source}: field {key!r} must be a JSON {typ.__name__}, got {type(d[key]).__name__}")
        seed = d.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise CaseError(f"{source}: field 'seed' must be an integer, got {seed!r}")
        layouts: dict[str, LayoutSpec] = {}
        for name, ld in d.get("layouts", {}).items():
            try:
                layouts[name] = LayoutSpec.from_dict(ld)
            except (LayoutError, TypeError) as e:
                raise CaseError(f"{source}: layouts[{name!r}]: {e}") from None
        values: dict[str, ValueSpec] = {}
        for name, vd in d.get("values", {}).items():
            try:
                values[name] = ValueSpec.from_dict(vd)
            except (ValueError_, TypeError) as e:
                raise CaseError(f"{source}: values[{name!r}]: {e}") from None
        return cls(
            op=d["op"], layouts=layouts, values=values, backend=d.get("backend", ""), params=d.get("params", {}),
            tolerances=d.get("tolerances", {}), seed=seed, env=d.get("env", {}), verdict=d.get("verdict", {}),
            note=d.get("note", ""), schema_version=version,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def case_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(json_path, safetensors_path)`` for a case named by either file or by its stem."""
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_suffix(".json"), p.with_suffix(".safetensors")


def save_case(case: Case, path: str | os.PathLike, tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write ``case`` to ``path`` (.json) and, if given, its input values to the sibling .safetensors.

    ``tensors`` are stored contiguous, on the CPU, in their own dtype; each must
    match its layout's logical shape.  The tensors passed in are not modified.
    Returns the JSON path.
    """
    from safetensors.torch import save_file

    json_path, st_path = case_paths(path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    if tensors:
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise CaseError(f"tensors[{name!r}] is a {type(t).__name__}, not a tensor")
            spec = case.layouts.get(name)
            if spec is not None and tuple(t.shape) != spec.shape:
                raise CaseError(f"tensors[{name!r}] has shape {tuple(t.shape)}, its layout says {spec.shape}")
            out[name] = t.detach().to("cpu").contiguous().clone()
        save_file(out, str(st_path), metadata={"schema_version": str(SCHEMA_VERSION), "op": case.op})
    elif st_path.exists():
        st_path.unlink()  # never leave a stale tensor file beside a new description
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(case.to_json() + "\n")
    tmp.replace(json_path)
    return json_path


def load_case(path: str | os.PathLike) -> tuple[Case, dict[str, torch.Tensor]]:
    """Read and validate a case; returns ``(case, tensors)`` (``tensors`` empty when no .safetensors exists)."""
    json_path, st_path = case_paths(path)
    if not json_path.exists():
        raise CaseError(f"case file {json_path} does not exist")
    data = read_json(json_path, CaseError, label=f"case file {json_path}", kind="a case file",
                     max_bytes=_MAX_JSON_BYTES)
    case = Case.from_dict(data, source=str(json_path))
    tensors: dict[str, torch.Tensor] = {}
    if st_path.exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(st_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CaseError(f"tensor file {st_path} is not a valid safetensors file: {e}") from None
        for name, t in tensors.items():
            spec = case.layouts.get(name)
            if spec is None:
                raise CaseError(f"{st_path} holds tensor {name!r} but the case has no layout of that name")
            if tuple(t.shape) != spec.shape:
                raise CaseError(f"{st_path}: tensor {name!r} has shape {tuple(t.shape)}, its layout says {spec.shape}")
    missing = [n for n in case.layouts if n not in tensors and n not in case.values]
    if missing:
        raise CaseError(
            f"{json_path}: inputs {missing} have a layout but neither stored values ({st_path.name}) nor a value recipe"
        )
    return case, tensors


def format_case(case: Case, tensors: Mapping[str, torch.Tensor] | None = None) -> str:
    """A readable multi-line summary: op, verdict, each input's layout and values."""
    lines = [f"op: {case.op}" + (f"  backend: {case.backend}" if case.backend else "")]
    v = case.verdict
    if v:
        head = v.get("verdict", "?")
        lines.append(f"verdict: {head}" + (f" - {v['message']}" if v.get("message") else ""))
        for key in ("metrics", "bound", "attribution"):
            if v.get(key):
                lines.append(f"  {key}: {json.dumps(v[key], sort_keys=True)}")
    if case.params:
        lines.append(f"params: {json.dumps(case.params, sort_keys=True)}")
    lines.append("inputs:")
    for name, spec in case.layouts.items():
        src = "stored" if tensors and name in tensors else (case.values[name].describe() if name in case.values else "?")
        lines.append(f"  {name}: {spec.describe()}")
        lines.append(f"  {' ' * len(name)}  values: {src}")
    if case.tolerances:
        lines.append(f"tolerances: {json.dumps(case.tolerances, sort_keys=True)}")
    if case.env:
        keys = ("device", "capability", "torch", "cuda")
        lines.append("ran on: " + ", ".join(f"{k}={case.env[k]}" for k in keys if k in case.env))
    if case.note:
        lines.append(f"note: {case.note}")
    return "\n".join(lines)


def _cmd_show(args: argparse.Namespace) -> int:
    try:
        case, tensors = load_case(args.case)
    except CaseError as e:
        print(f"harness show: {e}")
        return 2
    print(format_case(case, tensors))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("show", help="print a case file's layouts and verdict")
    p.add_argument("case", help="path to CASE.json (or its .safetensors sibling, or the common stem)")
    p.set_defaults(func=_cmd_show)
