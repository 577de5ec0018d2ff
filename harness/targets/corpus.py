"""The regression corpus: case files of every defect the harness found, with what is expected of them.

Lives in ``tests/cases/``: each defect is a case file pair (``NAME.json`` + ``NAME.safetensors``)
plus one entry in ``tests/cases/index.json``::

    {"schema_version": 1, "cases": [
      {"file": "NAME.json", "op": "legacy.wanvideo_late2025", "layout_class": "values_beyond_448",
       "verdict": "input_mutation",                      # expected verdict when replayed
       "description": "clamps the caller's tensor in place to +-448",   # one line: what fails
       "versions": "torch 2.13.0 CPU",                   # one line: where it was seen failing
       "device": "cpu",                                  # replay on "cpu" or "cuda"
       "min_capability": null, "torch_min": null, "torch_below": null}   # where the expectation holds
    ]}

``tests/cases/README.md`` is generated from the index (one line per case).  ``test_corpus.py``
replays every entry and fails when the verdict differs from the expected one (a fix, or a new
way of failing: either way the corpus must be updated on purpose).

**Fingerprint** (how the matrix tells known failures from new ones): ``op|layout_class|verdict``,
e.g. ``legacy.comfyui|broadcast|layout_noninvariance``.  A failure of a known kind in a known
cell is not new, whatever its sizes or seed; a new verdict in a known cell is new.

Promote a case from a matrix run (copies the files, adds the entry, regenerates the README)::

    python -m harness.targets.corpus promote matrix-out/cases/NAME.json \\
        --why "what fails, in one line" --versions "torch 2.11+cu130, H200" [--device cuda --min-capability 9.0]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

from harness._jsonfile import read_json

__all__ = [
    "CORPUS_SCHEMA_VERSION",
    "DEFAULT_CORPUS",
    "CorpusError",
    "CorpusEntry",
    "fingerprint",
    "load_corpus",
    "save_index",
    "render_readme",
    "promote",
    "applies_here",
    "main",
]

CORPUS_SCHEMA_VERSION = 1
#: ``tests/cases`` of the repository this package sits in: the default of the ``--corpus`` options
#: (this module's CLI and ``python -m harness matrix``); the functions below take the folder as an argument.
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "tests" / "cases"
_INDEX = "index.json"
_README = "README.md"


class CorpusError(ValueError):
    """The corpus index or one of its case files is malformed; the message names the entry and the fix."""


def fingerprint(op: str, layout_class: str, verdict: str) -> str:
    """``op|layout_class|verdict``: what the matrix matches failures against the corpus by."""
    return f"{op}|{layout_class}|{verdict}"


@dataclass(frozen=True)
class CorpusEntry:
    """One known defect (see the module docstring for the fields)."""

    file: str
    op: str
    layout_class: str
    verdict: str
    description: str
    versions: str
    device: str = "cpu"
    min_capability: str | None = None
    torch_min: str | None = None
    torch_below: str | None = None

    def __post_init__(self) -> None:
        for f in ("file", "op", "layout_class", "verdict", "description", "versions", "device"):
            v = getattr(self, f)
            if not isinstance(v, str) or not v.strip():
                raise CorpusError(
                    f"corpus entry {_short(self.file)}: field {f!r} must be a non-empty string, got {_short(v)}"
                )
            if "\n" in v:
                raise CorpusError(f"corpus entry {_short(self.file)}: field {f!r} must be one line")
            if not v.isprintable():
                raise CorpusError(
                    f"corpus entry {_short(self.file)}: field {f!r} holds control characters: {_short(v)}"
                )
        for f in ("min_capability", "torch_min", "torch_below"):
            v = getattr(self, f)
            if v is not None and not isinstance(v, str):
                raise CorpusError(f"corpus entry {self.file!r}: field {f!r} must be a string or null, got {_short(v)}")
        if os.path.isabs(self.file) or ".." in Path(self.file).parts or not self.file.endswith(".json"):
            raise CorpusError(f"corpus entry file {self.file!r} must be a relative NAME.json inside the corpus")
        if self.device not in ("cpu", "cuda"):
            raise CorpusError(f"corpus entry {self.file!r}: device {self.device!r} must be 'cpu' or 'cuda'")
        from harness.verdicts import Verdict

        try:
            Verdict.parse(self.verdict)
        except ValueError as e:
            raise CorpusError(f"corpus entry {self.file!r}: {e}") from None
        if self.min_capability is not None and not re.fullmatch(r"\d+\.\d+", str(self.min_capability)):
            raise CorpusError(
                f"corpus entry {self.file!r}: min_capability {self.min_capability!r} must look like '8.9'"
            )
        for f in ("torch_min", "torch_below"):
            v = getattr(self, f)
            if v is not None and not re.fullmatch(r"\d+(\.\d+)*", str(v)):
                raise CorpusError(f"corpus entry {self.file!r}: {f} {v!r} must be a version like '2.13'")

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.op, self.layout_class, self.verdict)

    def one_line(self) -> str:
        """``file: op x class -> verdict -- description (versions)``, the README line."""
        where = self.device + (f", compute capability >= {self.min_capability}" if self.min_capability else "")
        return (
            f"- `{self.file}`: **{self.op}** × `{self.layout_class}` → `{self.verdict}` — {self.description} "
            f"(seen on: {self.versions}; replayed on {where})"
        )

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "CorpusEntry":
        if not isinstance(d, dict):
            raise CorpusError(f"{where}: each entry must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CorpusError(f"{where}: unknown fields {sorted(unknown)}; allowed: {sorted(known)}")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in d]
        if missing:
            raise CorpusError(f"{where}: missing fields {missing}")
        return cls(**d)


def _short(x: object, limit: int = 60) -> str:
    r = repr(x)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _version(v: str) -> tuple[int, ...]:
    m = re.match(r"\s*(\d+(?:\.\d+)*)", str(v))
    return tuple(int(p) for p in m.group(1).split(".")) if m else ()


def load_corpus(corpus: str | os.PathLike, *, check_files: bool = True) -> list[CorpusEntry]:
    """Entries of ``corpus/index.json`` (validated; ``check_files`` also loads every case and checks it agrees)."""
    d = Path(corpus)
    idx = d / _INDEX
    if not idx.exists():
        return []
    data = read_json(idx, CorpusError, label=str(idx), kind="a corpus index")  # regular file, capped, depth-bounded
    if not isinstance(data, dict) or data.get("schema_version") != CORPUS_SCHEMA_VERSION:
        raise CorpusError(f"{idx}: expected {{'schema_version': {CORPUS_SCHEMA_VERSION}, 'cases': [...]}}")
    cases = data.get("cases")
    if not isinstance(cases, list):
        raise CorpusError(f"{idx}: 'cases' must be a list")
    entries = [CorpusEntry.from_dict(c, f"{idx} cases[{i}]") for i, c in enumerate(cases)]
    seen: set[str] = set()
    for e in entries:
        if e.file in seen:
            raise CorpusError(f"{idx}: {e.file} is listed twice")
        seen.add(e.file)
        if check_files:
            _check_entry(d, e)
    return entries


def _check_entry(d: Path, e: CorpusEntry) -> None:
    from harness.cases import CaseError, load_case

    try:
        case, _ = load_case(d / e.file)
    except CaseError as err:
        raise CorpusError(f"corpus entry {e.file}: {err}") from None
    if case.op != e.op:
        raise CorpusError(f"corpus entry {e.file}: index says op {e.op!r}, the case file says {case.op!r}")
    cls = case.params.get("layout_class")
    if cls is not None and cls != e.layout_class:
        raise CorpusError(f"corpus entry {e.file}: index says layout class {e.layout_class!r}, the case says {cls!r}")


def save_index(entries: Sequence[CorpusEntry], corpus: str | os.PathLike) -> Path:
    """Write ``index.json`` and the generated ``README.md``; returns the index path."""
    d = Path(corpus)
    d.mkdir(parents=True, exist_ok=True)
    data = {
        "schema_version": CORPUS_SCHEMA_VERSION,
        "cases": [asdict(e) for e in sorted(entries, key=lambda e: e.file)],
    }
    idx = d / _INDEX
    tmp = idx.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(idx)
    (d / _README).write_text(render_readme(entries))
    return idx


def render_readme(entries: Iterable[CorpusEntry]) -> str:
    """The corpus README: how it works, then one line per case."""
    lines = [
        "# Regression corpus",
        "",
        "Case files of defects the harness found, replayed by `tests/property/test_corpus.py`, which fails when a",
        "case's verdict changes (a fix or a new failure mode: update the entry on purpose). The matrix",
        "(`python -m harness matrix --fail-on-new`) treats a failure whose `op|layout_class|verdict` is listed here",
        "as known. Generated from `index.json` by `python -m harness.targets.corpus`; do not edit by hand.",
        "",
        "Add a case from a matrix run:",
        "",
        "```bash",
        'python -m harness.targets.corpus promote matrix-out/cases/NAME.json --why "what fails" \\',
        '    --versions "torch 2.11+cu130, H200" [--device cuda --min-capability 9.0]',
        "```",
        "",
        "## Cases",
        "",
    ]
    lines += [e.one_line() for e in sorted(entries, key=lambda e: e.file)] or ["(none yet)"]
    return "\n".join(lines) + "\n"


def _safe_stem(text: str) -> str:
    return "".join(c if c.isalnum() or c == "-" else "_" for c in text)[:150]


def promote(
    case_path: str | os.PathLike,
    *,
    description: str,
    versions: str,
    corpus: str | os.PathLike,
    device: str | None = None,
    min_capability: str | None = None,
    torch_min: str | None = None,
    torch_below: str | None = None,
    verdict: str | None = None,
    name: str | None = None,
) -> CorpusEntry:
    """Copy a case file (and its .safetensors) into the corpus and list it in the index.

    The expected verdict is the one recorded in the case file (``verdict`` overrides it); the
    layout class comes from ``case.params["layout_class"]``; ``device`` defaults to where the
    case ran (``cuda`` when its environment says so).  An existing entry for the same file name
    is replaced.
    """
    from harness.cases import CaseError, case_paths, load_case

    try:
        case, _ = load_case(case_path)
    except CaseError as e:
        raise CorpusError(f"cannot promote {case_path}: {e}") from None
    expected = verdict or (case.verdict or {}).get("verdict")
    if not expected:
        raise CorpusError(f"{case_path} records no verdict; pass verdict=... (e.g. 'input_mutation')")
    cls = case.params.get("layout_class")
    if not cls:
        raise CorpusError(f"{case_path} has no params['layout_class'] (not a matrix case); add one to the case file")
    ran_on = str((case.env or {}).get("device_type") or (case.env or {}).get("device") or "cpu")
    dev = device or ("cuda" if ran_on.startswith("cuda") else "cpu")
    d = Path(corpus)
    d.mkdir(parents=True, exist_ok=True)
    stem = _safe_stem(name or f"{case.op}-{cls}-{expected}")
    src_json, src_st = case_paths(case_path)
    dst_json, dst_st = d / f"{stem}.json", d / f"{stem}.safetensors"
    if src_json.resolve() != dst_json.resolve():
        shutil.copyfile(src_json, dst_json)
        if src_st.exists():
            shutil.copyfile(src_st, dst_st)
        elif dst_st.exists():
            dst_st.unlink()
    entry = CorpusEntry(
        file=dst_json.name,
        op=case.op,
        layout_class=str(cls),
        verdict=str(expected),
        description=description,
        versions=versions,
        device=dev,
        min_capability=min_capability,
        torch_min=torch_min,
        torch_below=torch_below,
    )
    entries = [e for e in load_corpus(d, check_files=False) if e.file != entry.file] + [entry]
    save_index(entries, d)
    return entry


def applies_here(
    entry: CorpusEntry, *, torch_version: str, cuda_capability: tuple[int, int] | None
) -> tuple[bool, str]:
    """Does the entry's expectation hold on this machine? (ok, reason naming what is missing).

    ``cuda_capability``: of the first visible GPU, None without one (probe it in a subprocess).
    """
    if entry.device == "cuda":
        if cuda_capability is None:
            return False, f"{entry.file} replays on CUDA: no CUDA device"
        if entry.min_capability is not None:
            need = _version(entry.min_capability)
            if tuple(cuda_capability) < need:
                return False, (
                    f"{entry.file} needs compute capability >= {entry.min_capability}, "
                    f"found {cuda_capability[0]}.{cuda_capability[1]}"
                )
    tv = _version(torch_version)
    if entry.torch_min is not None and tv < _version(entry.torch_min):
        return False, f"{entry.file}: expectation recorded for torch >= {entry.torch_min}, found {torch_version}"
    if entry.torch_below is not None and tv >= _version(entry.torch_below):
        return False, f"{entry.file}: expectation recorded for torch < {entry.torch_below}, found {torch_version}"
    return True, ""


# ------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.targets.corpus {promote,list,check}``."""
    p = argparse.ArgumentParser(prog="python -m harness.targets.corpus", description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help=f"corpus directory (default {DEFAULT_CORPUS})")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("promote", help="copy a case file into the corpus and index it")
    pr.add_argument("case", help="CASE.json from a matrix run (matrix-out/cases/...)")
    pr.add_argument("--why", required=True, help="one line: what fails")
    pr.add_argument("--versions", required=True, help="one line: where it was seen failing (torch/CUDA/GPU)")
    pr.add_argument("--device", choices=("cpu", "cuda"), default=None, help="where to replay (default: where it ran)")
    pr.add_argument("--min-capability", default=None, help="e.g. 9.0: skip the replay on older GPUs")
    pr.add_argument("--torch-min", default=None, help="expectation holds from this torch version on")
    pr.add_argument("--torch-below", default=None, help="expectation holds below this torch version")
    pr.add_argument("--verdict", default=None, help="expected verdict (default: the one in the case file)")
    pr.add_argument("--name", default=None, help="file stem in the corpus (default op-class-verdict)")
    sub.add_parser("list", help="one line per corpus case")
    sub.add_parser("check", help="validate the index and every case file (exit 1 on a problem)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "promote":
            e = promote(
                args.case,
                description=args.why,
                versions=args.versions,
                corpus=args.corpus,
                device=args.device,
                min_capability=args.min_capability,
                torch_min=args.torch_min,
                torch_below=args.torch_below,
                verdict=args.verdict,
                name=args.name,
            )
            print(f"added {e.file} ({e.fingerprint})")
            return 0
        entries = load_corpus(args.corpus, check_files=args.cmd == "check")
        if args.cmd == "list":
            print(render_readme(entries).split("## Cases", 1)[1].strip())
        else:
            print(f"{len(entries)} corpus case(s) OK")
        return 0
    except CorpusError as e:
        print(f"corpus: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
