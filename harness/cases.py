"""Case files: one replayable test case as JSON + safetensors.

A case is two sibling files:

- ``NAME.json``: the schema-versioned description (op and backend, parameters,
  input layouts, value recipes, tolerances, seed, the versions and device it
  ran on, and its verdict);
- ``NAME.safetensors``: the inputs' values as contiguous tensors of their
  logical shapes and layout dtypes (optional: without it the values are
  regenerated from the recipes).  The layout is never stored in the tensor
  file: replay re-materializes each input with its ``LayoutSpec``, poison and all.

**Writing a case as one unit.**  :func:`save_case` writes both files under unique hidden temp
names in the target folder (``.NAME.json.<pid>-<token>.tmp``), then, holding an exclusive
``flock`` on the folder (so two concurrent saves of one name never interleave), renames the
tensor file into place and then the JSON.  The tensor file's safetensors metadata records
``case_digest``, a SHA-256 of the JSON description (without its free-text ``note``).  A save
killed between the two renames leaves a pair whose digests disagree, and :func:`load_case` refuses
it with one line instead of pairing new tensors with an old description (files written before the
digest existed carry none and load as before; the JSON schema is unchanged, so older checkouts --
``git bisect`` -- still read new files).  Temp files are removed in ``finally``; one left by a
killed process (its pid gone, older than :data:`STALE_TEMP_SECONDS`) is removed by the next save of
that name, and loaders never look at them.

**Loading is bounded and validated.**  Both files must be regular files, read through one handle
with a cap (JSON: :data:`MAX_JSON_BYTES`; tensors: what the layouts need plus a header allowance);
JSON nesting is bounded; every field is checked (dtype names from ``harness.layouts.DTYPES``,
integer ``schema_version``, printable op and input names, shapes/offsets/pads/steps whose
allocation fits the element budget -- :func:`max_case_elements` -- checked before anything is
allocated); stored tensors must have their layout's dtype and shape.  Errors are
:class:`CaseError` (one line naming the field and the fix); nothing is unpickled, ``torch.load`` is
never used.  :func:`printable` escapes untrusted text for a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from harness._jsonfile import pid_alive, read_json, read_regular_file
from harness.layouts import LayoutError, LayoutSpec
from harness.values import ValueError_, ValueSpec

__all__ = [
    "SCHEMA_VERSION",
    "Case",
    "CaseError",
    "CaseTooNew",
    "save_case",
    "load_case",
    "case_paths",
    "format_case",
    "add_parser",
    "printable",
    "case_elements",
    "max_case_elements",
    "check_budget",
    "DEFAULT_MAX_CASE_ELEMENTS",
    "MAX_CASE_ELEMENTS_ENV",
    "STALE_TEMP_SECONDS",
    "print_problem",
    "tolerant_stdout",
    "add_budget_argument",
]

SCHEMA_VERSION = 1
MAX_JSON_BYTES = 16 * 1024 * 1024
#: Room for the safetensors header beyond the tensors' own bytes.
_HEADER_BYTES = 1 << 20
#: Most inputs one case may have; longest op / input name.
_MAX_INPUTS = 64
_MAX_NAME = 200
#: The element budget of one case: total storage + logical elements over its inputs (see :func:`case_elements`).
#: 2**28 = 4 x the largest tensor the matrix's "wan" size preset draws (2**26 elements, harness/targets/base.py)
#: -- every generated case fits, with room for q, k, v and an output -- and 1 GiB as float32.
DEFAULT_MAX_CASE_ELEMENTS = 1 << 28
MAX_CASE_ELEMENTS_ENV = "HARNESS_CASE_MAX_ELEMENTS"
#: A temp file of a save whose process is gone is removed by the next save once it is this old.
STALE_TEMP_SECONDS = 60.0
_TMP_RE = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


class CaseError(ValueError):
    """A case file is missing, malformed, or inconsistent with its tensors."""


class CaseTooNew(CaseError):
    """The case file's ``schema_version`` is newer than this checkout reads (it cannot run *here*)."""


def printable(text: Any) -> str:
    """``text`` safe for a terminal on one line: every non-printable character (control and escape
    sequences, newlines, lone surrogates, bidi overrides) written as its ``\\x``/``\\u`` escape."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)


def _short(x: Any, limit: int = 60) -> str:
    r = repr(x)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _check_name(value: Any, what: str) -> None:
    if not isinstance(value, str) or not value or len(value) > _MAX_NAME or not value.isprintable():
        raise CaseError(
            f"{what} must be a non-empty printable string of at most {_MAX_NAME} characters, got {_short(value)}"
        )


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
        _check_name(self.op, "case 'op'")
        if len(self.layouts) > _MAX_INPUTS:
            raise CaseError(f"a case may have at most {_MAX_INPUTS} inputs, got {len(self.layouts)}")
        for name, spec in self.layouts.items():
            _check_name(name, "an input name")
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
        if type(version) is not int:  # true and 1.0 compare equal to 1
            raise CaseError(f"{source}: schema_version must be an integer, got {_short(version)}")
        if version > SCHEMA_VERSION:
            raise CaseTooNew(
                f"{source}: schema_version {version} was written by a newer harness; this checkout "
                f"reads version {SCHEMA_VERSION}"
            )
        if version != SCHEMA_VERSION:
            raise CaseError(
                f"{source}: schema_version {version} is not supported; this harness reads version {SCHEMA_VERSION}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            shown = ", ".join(_short(k, 40) for k in sorted(unknown)[:5]) + (", ..." if len(unknown) > 5 else "")
            raise CaseError(f"{source}: unknown fields {shown}; allowed: {sorted(known)}")
        if "op" not in d:
            raise CaseError(f"{source}: missing 'op'")
        for key, typ in (
            ("params", dict),
            ("layouts", dict),
            ("values", dict),
            ("tolerances", dict),
            ("env", dict),
            ("verdict", dict),
            ("backend", str),
            ("note", str),
        ):
            if key in d and not isinstance(d[key], typ):
                raise CaseError(f"{source}: field {key!r} must be a JSON {typ.__name__}, got {type(d[key]).__name__}")
        seed = d.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise CaseError(f"{source}: field 'seed' must be an integer, got {_short(seed)}")
        for key in ("layouts", "values"):
            if len(d.get(key, {})) > _MAX_INPUTS:
                raise CaseError(f"{source}: {key!r} has {len(d[key])} entries; a case may have at most {_MAX_INPUTS}")
        layouts: dict[str, LayoutSpec] = {}
        for name, ld in d.get("layouts", {}).items():
            try:
                _check_name(name, "an input name")
                layouts[name] = LayoutSpec.from_dict(ld)
            except (LayoutError, TypeError, CaseError) as e:
                raise CaseError(f"{source}: layouts[{_short(name, 40)}]: {e}") from None
        values: dict[str, ValueSpec] = {}
        for name, vd in d.get("values", {}).items():
            try:
                values[name] = ValueSpec.from_dict(vd)
            except (ValueError_, TypeError) as e:
                raise CaseError(f"{source}: values[{_short(name, 40)}]: {e}") from None
        try:
            return cls(
                op=d["op"],
                layouts=layouts,
                values=values,
                backend=d.get("backend", ""),
                params=d.get("params", {}),
                tolerances=d.get("tolerances", {}),
                seed=seed,
                env=d.get("env", {}),
                verdict=d.get("verdict", {}),
                note=d.get("note", ""),
                schema_version=version,
            )
        except CaseError as e:
            raise CaseError(f"{source}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ------------------------------------------------------------------------------ element budget


def case_elements(case: Case) -> int:
    """Elements a run of ``case`` allocates for its inputs: per input, its whole poisoned storage
    (offset + padded allocation) plus its logical values (broadcast views included).  Computed from the
    layouts alone, before anything is allocated."""
    return sum(spec.storage_numel() + spec.numel for spec in case.layouts.values())


def max_case_elements(override: int | None = None) -> int:
    """The element budget: ``override`` (a CLI flag), else ``$HARNESS_CASE_MAX_ELEMENTS``, else
    :data:`DEFAULT_MAX_CASE_ELEMENTS`."""
    if override is not None:
        if type(override) is not int or override < 1:
            raise CaseError(f"--max-elements {override!r} must be a positive integer")
        return override
    raw = os.environ.get(MAX_CASE_ELEMENTS_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_MAX_CASE_ELEMENTS
    try:
        value = int(raw)
    except ValueError:
        raise CaseError(f"{MAX_CASE_ELEMENTS_ENV}={raw[:40]!r} is not an integer; unset it or give a count") from None
    if value < 1:
        raise CaseError(f"{MAX_CASE_ELEMENTS_ENV}={value} must be >= 1")
    return value


def check_budget(case: Case, budget: int | None = None, *, source: str = "case") -> None:
    """Raise :class:`CaseError` when ``case`` needs more than ``budget`` elements (default :func:`max_case_elements`)."""
    limit = max_case_elements(budget)
    need = case_elements(case)
    if need > limit:
        raise CaseError(
            f"{source}: its inputs need {need:,} elements (storage + values), over the budget of "
            f"{limit:,}; if this machine has the memory, raise it with --max-elements N or "
            f"{MAX_CASE_ELEMENTS_ENV}=N"
        )


# ------------------------------------------------------------------------------ files


def case_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(json_path, safetensors_path)`` for a case named by either file or by its stem."""
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_suffix(".json"), p.with_suffix(".safetensors")


def _pair_digest(description: Mapping[str, Any]) -> str:
    """SHA-256 of a case description as JSON (``note`` left out: editing it by hand keeps the pair)."""
    d = {k: v for k, v in description.items() if k != "note"}
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _remove_stale_temps(final: Path) -> None:
    """Delete temp files of earlier saves of ``final`` whose process is gone and that are old enough."""
    try:
        names = os.listdir(final.parent)
    except OSError:
        return
    now = time.time()
    for n in names:
        m = _TMP_RE.match(n)
        legacy = n == f"{final.name}.tmp"  # the fixed temp name of harness versions before this one
        if not legacy and (m is None or m["final"] != final.name or pid_alive(int(m["pid"]))):
            continue
        p = final.parent / n
        with contextlib.suppress(OSError):
            if now - p.lstat().st_mtime > STALE_TEMP_SECONDS:
                p.unlink()


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` for the renames of one save (none where the platform or filesystem
    has no flock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not Linux
        yield
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        with contextlib.suppress(OSError):  # a filesystem without flock: the renames still happen, unserialized
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_case(case: Case, path: str | os.PathLike, tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write ``case`` to ``path`` (.json) and, if given, its input values to the sibling .safetensors, as one unit.

    ``tensors`` are stored contiguous, on the CPU, in their layout's dtype; each must match its
    layout's logical shape.  The tensors passed in are not modified.  Without ``tensors`` an
    existing sibling .safetensors is removed (after the new description is in place).  See the
    module docstring for how the pair is kept consistent.  Returns the JSON path.
    """
    from safetensors.torch import save as st_save

    json_path, st_path = case_paths(path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    text = case.to_json() + "\n"
    blob = None
    if tensors:
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise CaseError(f"tensors[{name!r}] is a {type(t).__name__}, not a tensor")
            spec = case.layouts.get(name)
            if spec is None:
                raise CaseError(f"tensors[{name!r}] has no layout of that name; layouts are {sorted(case.layouts)}")
            if tuple(t.shape) != spec.shape:
                raise CaseError(f"tensors[{name!r}] has shape {tuple(t.shape)}, its layout says {spec.shape}")
            out[name] = t.detach().to(device="cpu", dtype=spec.torch_dtype).contiguous().clone()
        meta = {"schema_version": str(SCHEMA_VERSION), "op": case.op, "case_digest": _pair_digest(json.loads(text))}
        blob = st_save(out, metadata=meta)
    _remove_stale_temps(json_path)
    _remove_stale_temps(st_path)
    tmp_json, tmp_st = _temp_name(json_path), _temp_name(st_path)
    try:
        if blob is not None:
            _write_synced(tmp_st, blob)
        _write_synced(tmp_json, text.encode())
        with _folder_lock(json_path.parent):
            if blob is not None:
                os.replace(tmp_st, st_path)
                os.replace(tmp_json, json_path)
            else:
                os.replace(tmp_json, json_path)
                with contextlib.suppress(FileNotFoundError):
                    st_path.unlink()  # never leave a stale tensor file beside a new description
    finally:
        for t in (tmp_st, tmp_json):
            with contextlib.suppress(FileNotFoundError):
                t.unlink()
    return json_path


def _directory_hint(p: Path) -> str:
    try:
        example = next((q for q in sorted(p.glob("*.json")) if q.name != "index.json"), None)
    except OSError:
        example = None
    return f"{p} is a directory, not a case file; " + (
        f"name a case file in it, e.g. {example}" if example else "it holds no case files (*.json)"
    )


def _header_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob already parsed by safetensors (so the header is valid)."""
    n = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8 : 8 + n]).get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def load_case(path: str | os.PathLike, *, max_elements: int | None = None) -> tuple[Case, dict[str, torch.Tensor]]:
    """Read and validate a case; returns ``(case, tensors)`` (``tensors`` empty when no .safetensors exists).

    Refuses, with :class:`CaseError`, anything malformed (see the module docstring) and a case whose
    inputs need more than ``max_elements`` (default :func:`max_case_elements`) -- before reading its tensors.
    """
    p = Path(path)
    if p.suffix not in (".json", ".safetensors") and p.is_dir():
        raise CaseError(_directory_hint(p))
    json_path, st_path = case_paths(p)
    label = f"case file {json_path}"
    data = read_json(json_path, CaseError, label=label, kind="a case file", max_bytes=MAX_JSON_BYTES)
    case = Case.from_dict(data, source=str(json_path))
    check_budget(case, max_elements, source=str(json_path))
    tensors: dict[str, torch.Tensor] = {}
    if os.path.lexists(st_path):
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load

        cap = _HEADER_BYTES + sum(spec.numel * spec.itemsize for spec in case.layouts.values())
        blob = read_regular_file(
            st_path,
            CaseError,
            label=f"tensor file {st_path}",
            max_bytes=cap,
            kind="a safetensors file for these layouts",
        )
        try:
            tensors = st_load(blob)
            meta = _header_metadata(blob)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CaseError(f"tensor file {st_path} is not a valid safetensors file: {msg}") from None
        digest = meta.get("case_digest")
        if digest is not None and digest != _pair_digest(data):
            raise CaseError(
                f"tensor file {st_path} was not written with this {json_path.name} (an interrupted or "
                f"concurrent save, or a hand edit); delete it to use the value recipes, or save the case again"
            )
        for name, t in tensors.items():
            spec = case.layouts.get(name)
            if spec is None:
                raise CaseError(f"{st_path} holds tensor {_short(name, 40)} but the case has no layout of that name")
            if tuple(t.shape) != spec.shape:
                raise CaseError(f"{st_path}: tensor {name!r} has shape {tuple(t.shape)}, its layout says {spec.shape}")
            if t.dtype != spec.torch_dtype:
                raise CaseError(
                    f"{st_path}: tensor {name!r} is {str(t.dtype).removeprefix('torch.')}, its layout says {spec.dtype}"
                )
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
        if v.get("attribution"):
            from harness.report import attribution_text

            said = attribution_text(v["attribution"])
            if said:
                lines.append(f"  {said}")
        for key in ("metrics", "bound", "attribution"):
            if v.get(key):
                lines.append(f"  {key}: {json.dumps(v[key], sort_keys=True)}")
    if case.params:
        lines.append(f"params: {json.dumps(case.params, sort_keys=True)}")
    lines.append("inputs:")
    for name, spec in case.layouts.items():
        src = (
            "stored" if tensors and name in tensors else (case.values[name].describe() if name in case.values else "?")
        )
        lines.append(f"  {name}: {spec.describe()}")
        lines.append(f"  {' ' * len(name)}  values: {src}")
    if case.tolerances:
        lines.append(f"tolerances: {json.dumps(case.tolerances, sort_keys=True)}")
    if case.env:
        keys = ("device", "capability", "torch", "cuda")
        lines.append("ran on: " + ", ".join(f"{k}={case.env[k]}" for k in keys if k in case.env))
    if case.note:
        lines.append(f"note: {case.note}")
    return "\n".join(printable(line) for line in lines)


def print_problem(command: str, message: Any) -> None:
    """One line on stderr: ``harness COMMAND: message`` (escaped, so a hostile file cannot drive the terminal)."""
    print(f"harness {command}: {printable(message)}", file=sys.stderr, flush=True)


def tolerant_stdout() -> None:
    """Let stdout write any text (an unencodable character becomes an escape, never UnicodeEncodeError)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")


def add_budget_argument(p: argparse.ArgumentParser) -> None:
    """``--max-elements N``: the element budget flag shared by show, replay and minimize."""
    p.add_argument(
        "--max-elements",
        type=int,
        default=None,
        metavar="N",
        help=f"refuse a case whose inputs need more than N elements (storage + values); default "
        f"${MAX_CASE_ELEMENTS_ENV} or {DEFAULT_MAX_CASE_ELEMENTS:,} (2**28)",
    )


def _cmd_show(args: argparse.Namespace) -> int:
    tolerant_stdout()
    try:
        case, tensors = load_case(args.case, max_elements=args.max_elements)
    except CaseError as e:
        print_problem("show", e)
        return 2
    print(format_case(case, tensors))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("show", help="print a case file's layouts and verdict")
    p.add_argument("case", help="path to CASE.json (or its .safetensors sibling, or the common stem)")
    add_budget_argument(p)
    p.set_defaults(func=_cmd_show)
