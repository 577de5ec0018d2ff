"""Command line: ``python -m harness <subcommand>``.

Each subcommand lives in the module that owns its concern; that module exposes
``add_parser(subparsers)`` which registers its arguments and sets ``func`` (a
callable taking the parsed namespace and returning an exit code). Modules are
imported only when their subcommand is parsed, so ``python -m harness env``
never pays for the runner or the dashboard.

No subcommand prints a traceback for a user error: an exception of one of the harness's
user-error types (:data:`USER_ERRORS`: a bad case file, summary, corpus, matrix argument)
that a subcommand did not handle itself is one line on stderr and exit 2.  Anything else is a
bug in the harness: one line naming it and the file holding the full traceback
(``$HARNESS_CRASH_DIR``, default the system temp folder), exit :data:`INTERNAL_ERROR_EXIT`
(128: ``git bisect run`` aborts on it instead of marking the commit bad or skipping it).
Ctrl-C is "interrupted", exit 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import traceback
from datetime import datetime, timezone
from typing import Sequence

__all__ = ["main", "SUBCOMMANDS", "USER_ERRORS", "INTERNAL_ERROR_EXIT"]

#: exceptions that mean "your input is wrong" (module, class); looked up only in modules already imported
USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("harness.matrix", "MatrixError"),
    ("harness.report", "SummaryError"),
    ("harness.cases", "CaseError"),
    ("harness.targets.corpus", "CorpusError"),
    ("harness.layouts", "LayoutError"),
)
INTERNAL_ERROR_EXIT = 128

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "env": ("harness.env", "device, capability, library versions and attention backends"),
    "show": ("harness.cases", "print a case file's layouts and verdict"),
    "replay": (
        "harness.runner.replay",
        "rerun a case in a fresh worker (exit 0 pass, 1 fail, 2 harness-side problem, 125 cannot run here)",
    ),
    "minimize": ("harness.runner.minimize", "shrink a failing case one layout property at a time"),
    "matrix": ("harness.matrix", "drive every op and backend through every layout class; write a report"),
    "merge": ("harness.merge", "combine the outputs of `matrix --shard I/N` runs into one report"),
    "dashboard": ("harness.dashboard", "build the static benchmark dashboard from saved runs"),
    "contract": ("harness.contract", "print each op's measured layout contract; --diff OLD NEW names what narrowed"),
    "claims": ("harness.claims", "test the write-up's claims on this device (--scenarios: its Wan-block scenarios)"),
}


def _build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness", description="Layout and numerics harness for quantized attention and FP8 linear kernels."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in SUBCOMMANDS.items():
        if wanted == name:
            mod = importlib.import_module(module)
            mod.add_parser(sub)
        else:
            sub.add_parser(name, help=help_)
    return parser


def _is_user_error(e: BaseException) -> bool:
    types = [getattr(sys.modules[m], name, None) for m, name in USER_ERRORS if m in sys.modules]
    return any(isinstance(t, type) and isinstance(e, t) for t in types)


def _crash_report(e: BaseException) -> str:
    """Write the traceback of ``e`` to a new file; returns its path (or why it could not be written)."""
    folder = os.environ.get("HARNESS_CRASH_DIR") or tempfile.gettempdir()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=folder, prefix=f"harness-crash-{stamp}-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("harness " + " ".join(sys.argv[1:]) + "\n\n")
            traceback.print_exception(type(e), e, e.__traceback__, file=f)
        return path
    except OSError as err:
        return f"(could not be written to {folder}: {err.strerror or err})"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns its exit code (see the module docstring for errors)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; a harness bug keeps its traceback in a file
        first = (str(e).strip().splitlines() or [""])[0]
        if _is_user_error(e):
            print(f"harness: {first}", file=sys.stderr)
            return 2
        where = _crash_report(e)
        print(
            f"harness: internal error (a bug in the harness, not in your input): {type(e).__name__}: {first}; "
            f"full traceback in {where}; exit {INTERNAL_ERROR_EXIT}",
            file=sys.stderr,
        )
        return INTERNAL_ERROR_EXIT


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    func = getattr(args, "func", None)
    if func is None:  # pragma: no cover - a module forgot to set func
        parser.error(f"subcommand {args.command!r} is not implemented")
    from harness.runner.pool import default_start_method

    try:
        default_start_method()  # a bad $HARNESS_WORKER_START is named before any work starts
    except ValueError as e:
        print(f"harness {args.command}: {e}", file=sys.stderr)
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
