"""Command line: ``python -m harness <subcommand>``.

Each subcommand lives in the module that owns its concern; that module exposes
``add_parser(subparsers)`` which registers its arguments and sets ``func`` (a
callable taking the parsed namespace and returning an exit code). Modules are
imported only when their subcommand is parsed, so ``python -m harness env``
never pays for the runner or the dashboard.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

__all__ = ["main", "SUBCOMMANDS"]

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "env": ("harness.env", "device, capability, library versions and attention backends"),
    "show": ("harness.cases", "print a case file's layouts and verdict"),
    "replay": ("harness.runner.replay", "rerun a case in a fresh worker (exit 0 pass, 1 fail, 2 harness-side problem, 125 cannot run here)"),
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    func = getattr(args, "func", None)
    if func is None:  # pragma: no cover - a module forgot to set func
        parser.error(f"subcommand {args.command!r} is not implemented")
    return int(func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
