"""``python -m harness replay CASE``: rerun a case file in a fresh worker; exit codes made for ``git bisect run``.

Exit status (``--bisect`` changes only the harness-side row):
  0    the case passes (or, with ``--expect VERDICT``, its verdict is VERDICT)
  1    it still fails: a verdict about the op (drift, device_fault, timeout, ...), or not VERDICT
  2    a harness-side problem, never the op's fault: the case file is missing, unreadable,
       malformed or over the element budget (``--max-elements``), a bad argument, or the
       harness's own verdict (``error``; ``unsupported``: the harness cannot call the op as
       the case needs).  With ``--bisect`` these exit 128 instead, which makes
       ``git bisect run`` stop with the message visible (it would read 2 as "bad").
  125  it cannot run here: the target is unknown or unavailable (missing GPU capability or
       package), the case was recorded on CUDA and there is no GPU, the case file has a newer
       schema than this checkout reads, or this checkout's harness fails to start (a Python
       error before the case ran) -- ``git bisect`` skips such commits.

A case whose file records the verdict ``nondeterministic`` runs 6 times (``--repeat N`` sets the count for any
case) in one fresh interpreter, each run judged as usual (with its own second, identical call), and the
verdict counts are printed (``nondeterministic 2/6, pass 4/6``).  Its exit status: 0 when every run
passes (with ``--expect VERDICT``: when some run got VERDICT and every other run passed), 1 when any run
got a failing verdict about the op; else the rows above (2 / 128 before 125) for what the runs gave.

The case runs in a fresh interpreter (``python -m harness.runner.worker``); a device fault
is rerun with ``CUDA_LAUNCH_BLOCKING=1`` to name the faulting op, and ``--sanitizer`` adds a
``compute-sanitizer --tool memcheck`` run whose report is printed.  Problems are one line on
stderr; the element budget is checked before anything is allocated (and passed on to the
fresh worker through ``$HARNESS_CASE_MAX_ELEMENTS``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from harness.verdicts import Result, Verdict

__all__ = [
    "add_parser",
    "replay",
    "replay_runs",
    "default_repeat",
    "repeat_exit_code",
    "verdict_counts",
    "NONDETERMINISTIC_REPEAT",
    "choose_device",
    "exit_code",
    "harness_side",
    "EXIT_PASS",
    "EXIT_FAIL",
    "EXIT_HARNESS",
    "EXIT_BISECT_ABORT",
    "EXIT_CANNOT_RUN",
]

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_HARNESS = 2
EXIT_CANNOT_RUN = 125
#: ``git bisect run`` aborts on 128 and above; ``--bisect`` uses it for harness-side problems.
EXIT_BISECT_ABORT = 128
#: runs of a replay whose case file records ``nondeterministic`` (measured: such a case may pass 6 of 6 fresh
#: processes; each run here also makes its own second call, so 6 runs are 12 calls)
NONDETERMINISTIC_REPEAT = 6


def harness_side(verdict: Verdict) -> bool:
    """True for the harness's own verdicts (``error``, and ``unsupported`` where this checkout has it)."""
    return verdict is Verdict.ERROR or verdict is getattr(Verdict, "UNSUPPORTED", None)


def _harness_exit(bisect: bool) -> int:
    return EXIT_BISECT_ABORT if bisect else EXIT_HARNESS


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
    if recorded == "cpu":  # no CUDA probe (a child interpreter importing torch) for a case recorded on the CPU
        return "cpu", ""
    gpus = probe_devices()
    if recorded.startswith("cuda"):
        if not gpus:
            name = case_env.get("device_name", "")
            return None, (
                f"the case was recorded on CUDA ({name or recorded}) and no CUDA device is visible here; "
                "pass --device cpu to run it on the CPU anyway"
            )
        return gpus[0], ""
    return (gpus[0] if gpus else "cpu"), ""


def exit_code(result: Result, expect: Verdict | None, *, bisect: bool = False) -> int:
    """0/1/2/125 (128 for a harness-side verdict with ``bisect``) for a replayed Result (see the module docstring)."""
    if result.verdict is Verdict.UNAVAILABLE and expect is not Verdict.UNAVAILABLE:
        return EXIT_CANNOT_RUN
    if (result.attribution or {}).get("harness_broken"):
        return EXIT_CANNOT_RUN
    if expect is not None and result.verdict is expect:
        return EXIT_PASS
    if harness_side(result.verdict):
        return _harness_exit(bisect)
    if expect is not None:
        return EXIT_FAIL
    return EXIT_PASS if result.verdict is Verdict.PASS else EXIT_FAIL


def default_repeat(case: Any) -> int:
    """Runs a replay of ``case`` makes without ``--repeat``: :data:`NONDETERMINISTIC_REPEAT` when its file
    records ``nondeterministic``, else 1."""
    recorded = str((getattr(case, "verdict", None) or {}).get("verdict", ""))
    return NONDETERMINISTIC_REPEAT if recorded == Verdict.NONDETERMINISTIC.value else 1


def repeat_exit_code(results: list[Result], expect: Verdict | None, *, bisect: bool = False) -> int:
    """The exit status of a replay's runs (see the module docstring); one run: :func:`exit_code`."""
    if len(results) == 1:
        return exit_code(results[0], expect, bisect=bisect)
    codes = [
        EXIT_PASS if expect is not None and r.verdict is Verdict.PASS else exit_code(r, expect, bisect=bisect)
        for r in results
    ]
    if expect is not None and not any(r.verdict is expect for r in results):
        codes.append(EXIT_FAIL)  # the expected verdict never came back
    for code in (EXIT_FAIL, _harness_exit(bisect), EXIT_CANNOT_RUN):
        if code in codes:
            return code
    return EXIT_PASS


def verdict_counts(results: list[Result], repeat: int) -> str:
    """``nondeterministic 2/6, pass 4/6``: each verdict (first seen first) with its count out of ``repeat``."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r.verdict.value] = counts.get(r.verdict.value, 0) + 1
    text = ", ".join(f"{v} {n}/{repeat}" for v, n in counts.items())
    if len(results) < repeat:
        text += f"; {repeat - len(results)} not run (the process ended early)"
    return text


def _shown(results: list[Result]) -> Result:
    """The run a replay prints in full: the first that did not pass, else the first."""
    return next((r for r in results if r.verdict is not Verdict.PASS), results[0])


def replay(
    path: str | Path,
    *,
    device: str | None = None,
    sanitizer: bool = False,
    attribute: bool = True,
    timeout: float | None = None,
    max_elements: int | None = None,
) -> tuple[Result | None, str]:
    """Replay a case file in fresh processes; returns (Result, "") or (None, why it cannot run here).

    Raises ``harness.cases.CaseError`` for a file that is missing, malformed or over the element
    budget (``harness.cases.CaseTooNew`` for a newer schema), before anything runs.
    """
    from harness.cases import load_case

    case, _ = load_case(path, max_elements=max_elements)
    results, why = _run(path, case, device=device, sanitizer=sanitizer, attribute=attribute, timeout=timeout)
    return (_shown(results) if results else None), why


def replay_runs(
    path: str | Path,
    *,
    repeat: int | None = None,
    device: str | None = None,
    attribute: bool = True,
    timeout: float | None = None,
    max_elements: int | None = None,
) -> tuple[list[Result] | None, str]:
    """Replay a case file ``repeat`` times in one fresh process (default :func:`default_repeat`); returns
    (one Result per run, "") or (None, why it cannot run here). Raises like :func:`replay`."""
    from harness.cases import load_case

    case, _ = load_case(path, max_elements=max_elements)
    n = default_repeat(case) if repeat is None else int(repeat)
    return _run(path, case, device=device, sanitizer=False, attribute=attribute, timeout=timeout, repeat=n)


def _run(
    path: str | Path,
    case: Any,
    *,
    device: str | None,
    sanitizer: bool,
    attribute: bool,
    timeout: float | None,
    repeat: int = 1,
) -> tuple[list[Result], str]:
    from harness.runner.fresh import repeat_in_fresh_process
    from harness.runner.pool import DEFAULT_CASE_TIMEOUT, attribution_rerun, merge_attribution, run_in_fresh_process

    dev, why = choose_device(case.env, device)
    if dev is None:
        return [], why
    t = float(timeout or DEFAULT_CASE_TIMEOUT)
    if repeat == 1:
        results = [run_in_fresh_process(path, dev, launch_blocking=False, record_ops=False, timeout=t)]
    else:
        results = repeat_in_fresh_process(path, dev, repeat, timeout=t)
    result = next((r for r in results if r.verdict is Verdict.DEVICE_FAULT), _shown(results))
    if (result.verdict is Verdict.DEVICE_FAULT and attribute) or sanitizer:
        rerun = attribution_rerun(path, dev, sanitizer=True if sanitizer else None, case_timeout=t)  # None: auto
        if result.verdict is Verdict.DEVICE_FAULT:
            result.attribution = merge_attribution(result.attribution, rerun)
        else:
            att = dict(result.attribution or {})
            att.update({k: v for k, v in (rerun.attribution or {}).items() if k in ("sanitizer", "op", "frame")})
            att["rerun_verdict"] = rerun.verdict.value
            result.attribution = att
    for r in results:
        r.case_path = str(path)
        if not r.op:  # the process died before it could say
            r.op = case.op
        if not r.layouts:
            r.layouts = case.describe_layouts()
    return results, ""


def _cmd(args: argparse.Namespace) -> int:
    from harness.cases import (
        MAX_CASE_ELEMENTS_ENV,
        CaseError,
        CaseTooNew,
        load_case,
        print_problem,
        printable,
        tolerant_stdout,
    )

    tolerant_stdout()
    harness_exit = _harness_exit(args.bisect)
    abort = " (exit 128: git bisect run stops here; fix the problem, then rerun the bisect)" if args.bisect else ""
    expect = None
    if args.expect:
        try:
            expect = Verdict.parse(args.expect)
        except ValueError as e:
            print_problem("replay", f"{e}{abort}")
            return harness_exit
    repeat = None
    if args.repeat is not None:
        try:
            repeat = int(args.repeat)
        except ValueError:
            repeat = 0
        if repeat < 1:
            print_problem(
                "replay", f"--repeat {args.repeat!r}: give a whole number of runs >= 1, e.g. --repeat 6{abort}"
            )
            return harness_exit
    try:
        case, _ = load_case(args.case, max_elements=args.max_elements)
    except CaseTooNew as e:
        print_problem("replay", f"cannot run here: {e}")
        return EXIT_CANNOT_RUN
    except CaseError as e:
        print_problem("replay", f"{e}{abort}")
        return harness_exit
    if args.max_elements is not None:
        os.environ[MAX_CASE_ELEMENTS_ENV] = str(args.max_elements)  # the fresh worker loads the case too
    repeat = default_repeat(case) if repeat is None else repeat
    results, why = _run(
        args.case,
        case,
        device=args.device,
        sanitizer=args.sanitizer,
        attribute=not args.no_attribute,
        timeout=args.timeout,
        repeat=repeat,
    )
    if not results:
        print_problem("replay", f"cannot run here: {why}")
        return EXIT_CANNOT_RUN
    result = _shown(results)
    counts = verdict_counts(results, repeat)
    if args.json:
        data = result.to_json() if repeat == 1 else {"runs": [r.to_json() for r in results], "counts": counts}
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print("\n".join(printable(line) for line in result.format().splitlines()))
        recorded = str((case.verdict or {}).get("verdict", ""))
        if recorded:
            print(f"  recorded verdict: {printable(recorded)}")
        if repeat > 1:
            print(f"  runs in one fresh process: {counts}")
    code = repeat_exit_code(results, expect, bisect=args.bisect)
    if code == EXIT_CANNOT_RUN and result.verdict is not Verdict.UNAVAILABLE:
        print_problem("replay", "the harness itself failed to start here; exit 125 (cannot run)")
    elif harness_side(result.verdict) and code != EXIT_PASS:
        print_problem(
            "replay",
            f"verdict {result.verdict.value} is the harness's, not the op's: "
            f"{(result.message or '').splitlines()[0] if result.message else ''}{abort}",
        )
    return code


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``replay`` (see the module docstring for exit codes)."""
    p = subparsers.add_parser(
        "replay",
        help="rerun a case in a fresh worker (exit 0 pass, 1 fail, 2 harness-side problem, 125 cannot run)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("case", help="CASE.json (its .safetensors sibling is used when present)")
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N (default: where the case was recorded; cuda:0 if unknown and present)",
    )
    p.add_argument(
        "--sanitizer",
        action="store_true",
        help="also run it under compute-sanitizer --tool memcheck (a device fault's attribution uses it "
        "whenever it is installed and works)",
    )
    p.add_argument(
        "--expect",
        default=None,
        metavar="VERDICT",
        help="exit 0 iff the verdict is VERDICT (e.g. device_fault, rejected); for regression corpora",
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds before the case counts as a timeout")
    p.add_argument(
        "--repeat",
        default=None,
        metavar="N",
        help=f"run the case N times in one fresh process and print the verdict counts (default "
        f"{NONDETERMINISTIC_REPEAT} for a case recorded nondeterministic, else 1); exit 1 if any run fails",
    )
    p.add_argument("--no-attribute", action="store_true", help="skip the CUDA_LAUNCH_BLOCKING=1 rerun of a fault")
    p.add_argument("--json", action="store_true", help="print the Result as JSON")
    p.add_argument(
        "--bisect",
        action="store_true",
        help="for git bisect run: exit 128 (abort the bisect) instead of 2 on a harness-side problem",
    )
    from harness.cases import add_budget_argument

    add_budget_argument(p)
    _abort_on_bad_arguments_under_bisect(p)
    p.set_defaults(func=_cmd)


def _abort_on_bad_arguments_under_bisect(p: argparse.ArgumentParser) -> None:
    """argparse exits 2 on a bad argument, which ``git bisect run`` reads as "bad": with ``--bisect`` on the
    command line, exit 128 instead (bisect stops and shows argparse's message)."""
    plain_exit = p.exit

    def exit_(status: int = 0, message: str | None = None) -> None:
        if status == 2 and "--bisect" in sys.argv[1:]:
            status = EXIT_BISECT_ABORT
        plain_exit(status, message)

    p.exit = exit_  # type: ignore[method-assign]
