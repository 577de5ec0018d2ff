"""``python -m harness replay CASE``: rerun a case file in a fresh worker; exit codes made for ``git bisect run``.

Exit status:
  0    the case passes (or, with ``--expect VERDICT``, its verdict is VERDICT)
  1    it still fails (or its verdict is not VERDICT)
  125  it cannot run here: the target is unknown or unavailable (missing GPU capability or
       package), the case was recorded on CUDA and there is no GPU, the case file cannot be
       read by this checkout, or the harness itself fails to start -- ``git bisect`` skips such
       commits.

The case runs in a fresh interpreter (``python -m harness.runner.worker``); a device fault
is rerun with ``CUDA_LAUNCH_BLOCKING=1`` to name the faulting op, and ``--sanitizer`` adds a
``compute-sanitizer --tool memcheck`` run whose report is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from harness.verdicts import Result, Verdict

__all__ = ["add_parser", "replay", "choose_device", "exit_code", "EXIT_PASS", "EXIT_FAIL", "EXIT_CANNOT_RUN"]

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_CANNOT_RUN = 125


def choose_device(case_env: dict[str, Any], requested: str | None) -> tuple[str | None, str]:
    """(device to replay on, or None when it cannot run here; the reason)."""
    from harness.runner.pool import probe_devices

    if requested:
        if requested.startswith("cuda"):
            found = probe_devices()
            if not found:
                return None, f"--device {requested} asked for, but no CUDA device is visible"
            if requested != "cuda" and requested not in found:
                return None, f"--device {requested} is not visible here (visible: {', '.join(found)})"
            return (found[0] if requested == "cuda" else requested), ""
        return requested, ""
    recorded = str(case_env.get("device_type") or case_env.get("device") or "")
    gpus = probe_devices()
    if recorded.startswith("cuda"):
        if not gpus:
            name = case_env.get("device_name", "")
            return None, (f"the case was recorded on CUDA ({name or recorded}) and no CUDA device is visible here; "
                          "pass --device cpu to run it on the CPU anyway")
        return gpus[0], ""
    if recorded == "cpu":
        return "cpu", ""
    return (gpus[0] if gpus else "cpu"), ""


def exit_code(result: Result, expect: Verdict | None) -> int:
    """0/1/125 for a replayed Result (see the module docstring)."""
    if result.verdict is Verdict.UNAVAILABLE and expect is not Verdict.UNAVAILABLE:
        return EXIT_CANNOT_RUN
    if (result.attribution or {}).get("harness_broken"):
        return EXIT_CANNOT_RUN
    if expect is not None:
        return EXIT_PASS if result.verdict is expect else EXIT_FAIL
    return EXIT_PASS if result.verdict is Verdict.PASS else EXIT_FAIL


def replay(path: str | Path, *, device: str | None = None, sanitizer: bool = False, attribute: bool = True,
           timeout: float | None = None) -> tuple[Result | None, str]:
    """Replay a case file in fresh processes; returns (Result, "") or (None, why it cannot run here)."""
    from harness.cases import CaseError, load_case
    from harness.runner.pool import DEFAULT_CASE_TIMEOUT, attribution_rerun, merge_attribution, run_in_fresh_process

    try:
        case, _ = load_case(path)
    except CaseError as e:
        return None, f"cannot read the case with this checkout: {e}"
    dev, why = choose_device(case.env, device)
    if dev is None:
        return None, why
    t = float(timeout or DEFAULT_CASE_TIMEOUT)
    result = run_in_fresh_process(path, dev, launch_blocking=False, record_ops=False, timeout=t)
    if (result.verdict is Verdict.DEVICE_FAULT and attribute) or sanitizer:
        rerun = attribution_rerun(path, dev, sanitizer=sanitizer, case_timeout=t)
        if result.verdict is Verdict.DEVICE_FAULT:
            result.attribution = merge_attribution(result.attribution, rerun)
        else:
            att = dict(result.attribution or {})
            att.update({k: v for k, v in (rerun.attribution or {}).items() if k in ("sanitizer", "op", "frame")})
            att["rerun_verdict"] = rerun.verdict.value
            result.attribution = att
    result.case_path = str(path)
    if not result.op:  # the process died before it could say
        result.op = case.op
    if not result.layouts:
        result.layouts = case.describe_layouts()
    return result, ""


def _cmd(args: argparse.Namespace) -> int:
    expect = None
    if args.expect:
        try:
            expect = Verdict.parse(args.expect)
        except ValueError as e:
            print(f"harness replay: {e}", file=sys.stderr)
            return 2
    result, why = replay(args.case, device=args.device, sanitizer=args.sanitizer, attribute=not args.no_attribute,
                         timeout=args.timeout)
    if result is None:
        print(f"harness replay: cannot run here: {why}")
        return EXIT_CANNOT_RUN
    if args.json:
        print(json.dumps(result.to_json(), indent=2, sort_keys=True))
    else:
        print(result.format())
        recorded = _recorded_verdict(args.case)
        if recorded:
            print(f"  recorded verdict: {recorded}")
    code = exit_code(result, expect)
    if code == EXIT_CANNOT_RUN and result.verdict is not Verdict.UNAVAILABLE:
        print("harness replay: the harness itself failed to start here; exit 125 (cannot run)")
    return code


def _recorded_verdict(path: str) -> str:
    try:
        from harness.cases import load_case

        case, _ = load_case(path)
        return str(case.verdict.get("verdict", ""))
    except Exception:
        return ""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``replay`` (see the module docstring for exit codes)."""
    p = subparsers.add_parser("replay", help="rerun a case in a fresh worker (exit 0 pass, 1 fail, 125 cannot run)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", help="CASE.json (its .safetensors sibling is used when present)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: where the case was recorded; cuda:0 if unknown and present)")
    p.add_argument("--sanitizer", action="store_true", help="also run it under compute-sanitizer --tool memcheck")
    p.add_argument("--expect", default=None, metavar="VERDICT",
                   help="exit 0 iff the verdict is VERDICT (e.g. device_fault, rejected); for regression corpora")
    p.add_argument("--timeout", type=float, default=None, help="seconds before the case counts as a timeout")
    p.add_argument("--no-attribute", action="store_true", help="skip the CUDA_LAUNCH_BLOCKING=1 rerun of a fault")
    p.add_argument("--json", action="store_true", help="print the Result as JSON")
    p.set_defaults(func=_cmd)
