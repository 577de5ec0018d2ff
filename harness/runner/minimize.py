"""``python -m harness minimize CASE [--out FILE]``: shrink a failing case one property at a time.

Hypothesis already shrinks what it generates; this goes further on a case file
(from a nightly matrix, a user report, the corpus), keeping the *verdict*
unchanged at every step. Candidates, tried in this order, each kept only if the
verdict stays the same:

1. per input, one layout property removed (``LayoutSpec.simplifications``): the view
   ops, the offset (or only its misalignment), broadcast, the permuted memory
   order, the steps, the padding;
2. smaller dims: a size shared by several dims (K of both matmul operands) halved
   everywhere at once, then each dim halved or set to 1 alone -- ops that need
   matching sizes reject the rest, which changes the verdict, so those are not kept;
3. simpler values: a recipe replaced by ``normal``; stored tensors replaced by recipes.

Stored values are sliced along with the dims, so "the same numbers" survive
shrinking. The search repeats until a full pass changes nothing (or ``--max-steps``).

The element budget (``--max-elements``, ``$HARNESS_CASE_MAX_ELEMENTS``, see ``harness.cases``)
is checked on the case before anything runs and on every candidate before its inputs are made.

``--out`` names the file to write (default ``CASE-min.json`` beside the case); an existing
directory (or a path ending in ``/``) gets ``CASE-min.json`` inside it.  An existing file is
never overwritten without ``--force``.  Exit status: 0 minimized and written; 1 the case does
not fail here (nothing to keep); 2 a harness-side problem (the case file is missing, malformed
or over the budget, ``--out`` exists, a bad argument, or the case's verdict is the harness's own
``error``/``unsupported``); 125 it cannot run here (no GPU for a CUDA case, target unavailable).
Problems are one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from harness.verdicts import Result, Verdict

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from harness.cases import Case

__all__ = ["add_parser", "minimize", "candidates", "MinimizeResult", "NothingToMinimize"]


class NothingToMinimize(ValueError):
    """The case's own verdict gives nothing to keep (it passes, cannot run, or is the harness's verdict)."""

    def __init__(self, message: str, verdict: Verdict) -> None:
        super().__init__(message)
        self.verdict = verdict


@dataclasses.dataclass
class MinimizeResult:
    """The smallest case found, its values (may be empty), its verdict, and what was removed."""

    case: "Case"
    values: dict[str, "torch.Tensor"]
    verdict: Verdict
    removed: list[str]
    tried: int
    result: Result


def _slice_to(t: "torch.Tensor", shape: tuple[int, ...]) -> "torch.Tensor":
    return t[tuple(slice(0, s) for s in shape)].clone()


def _with_layout(case: "Case", name: str, spec: Any) -> "Case":
    layouts = dict(case.layouts)
    layouts[name] = spec
    return dataclasses.replace(case, layouts=layouts)


def candidates(case: "Case", values: Mapping[str, "torch.Tensor"]) -> Iterator[tuple[str, "Case", dict]]:
    """Simpler variants of ``case``: (what was removed, new case, new stored values)."""
    from harness.layouts import LayoutError
    from harness.values import ValueSpec

    vals = dict(values)
    # 1. layout properties, one at a time
    for name, spec in case.layouts.items():
        for what, simpler in spec.simplifications():
            yield f"{name}: {what}", _with_layout(case, name, simpler), vals
    # 2. smaller dims (only on inputs without view ops: their shape is the base shape)
    plain = {n: s for n, s in case.layouts.items() if not s.views}
    sizes = sorted({d for s in plain.values() for d in s.shape if d > 1}, reverse=True)
    for size in sizes:
        hits = [(n, i) for n, s in plain.items() for i, d in enumerate(s.shape) if d == size]
        if len(hits) < 2:
            continue
        try:
            new_case, new_vals = case, dict(vals)
            for n in {n for n, _ in hits}:
                spec = new_case.layouts[n]
                shape = tuple(size // 2 if d == size else d for d in spec.shape)
                new_case = _with_layout(new_case, n, spec.replace(shape=shape))
                if n in new_vals:
                    new_vals[n] = _slice_to(new_vals[n], shape)
        except LayoutError:
            continue
        yield f"size {size} -> {size // 2} in {sorted({n for n, _ in hits})}", new_case, new_vals
    for name, spec in plain.items():
        for i, d in enumerate(spec.shape):
            for new in sorted({1, d // 2}, reverse=True):
                if new >= d or new < 1:
                    continue
                shape = spec.shape[:i] + (new,) + spec.shape[i + 1 :]
                try:
                    new_spec = spec.replace(shape=shape)
                except LayoutError:
                    continue
                new_vals = dict(vals)
                if name in new_vals:
                    new_vals[name] = _slice_to(new_vals[name], shape)
                yield f"{name}: dim {i} {d} -> {new}", _with_layout(case, name, new_spec), new_vals
    # 3. simpler values
    for name, vs in case.values.items():
        if vs.kind != "normal" and name not in vals:
            values_ = dict(case.values)
            values_[name] = ValueSpec("normal", seed=vs.seed)
            yield f"{name}: values {vs.kind} -> normal", dataclasses.replace(case, values=values_), vals
    for name in list(vals):
        new_vals = {k: v for k, v in vals.items() if k != name}
        values_ = dict(case.values)
        values_.setdefault(name, ValueSpec("normal", seed=int(case.seed)))
        yield (
            f"{name}: stored values -> recipe {values_[name].kind}",
            dataclasses.replace(case, values=values_),
            new_vals,
        )


def minimize(
    case: "Case",
    values: Mapping[str, "torch.Tensor"] | None,
    run: Callable[["Case", dict], Result],
    *,
    max_steps: int = 300,
    log: Callable[[str], None] | None = None,
    max_elements: int | None = None,
) -> MinimizeResult:
    """Greedy shrink of ``case`` keeping the verdict ``run(case, values)`` gives it.

    ``run`` executes one candidate (a pool in practice, a stub in tests). Raises
    ``harness.cases.CaseError`` when the case is over the element budget (``max_elements``, default
    ``harness.cases.max_case_elements()``) and :class:`NothingToMinimize` when the case passes,
    cannot run, or gets a harness-side verdict; candidates over the budget are skipped unrun.
    """
    from harness.cases import case_elements, check_budget, max_case_elements
    from harness.runner.replay import harness_side

    check_budget(case, max_elements)
    budget = max_case_elements(max_elements)
    first = run(case, dict(values or {}))
    target = first.verdict
    why = first.message.splitlines()[0] if first.message else ""
    if not target.failed or harness_side(target):
        what = "the harness cannot run it as it needs" if harness_side(target) else "the case does not fail here"
        raise NothingToMinimize(f"{what} (verdict {target.value}: {why}); nothing to minimize", target)
    cur_case, cur_vals, cur_result = case, dict(values or {}), first
    removed: list[str] = []
    tried = 0
    progress = True
    while progress and tried < max_steps:
        progress = False
        for what, cand, cand_vals in candidates(cur_case, cur_vals):
            if tried >= max_steps:
                break
            if case_elements(cand) > budget:
                continue
            tried += 1
            r = run(cand, cand_vals)
            if r.verdict is target:
                removed.append(what)
                if log:
                    log(f"removed {what}")
                cur_case, cur_vals, cur_result = cand, cand_vals, r
                progress = True
                break  # restart from the simplest candidates of the new case
    return MinimizeResult(cur_case, cur_vals, target, removed, tried, cur_result)


def _out_path(case_arg: str, out: str | None) -> Path:
    """Where the minimal case goes (see the module docstring)."""
    from harness.cases import case_paths

    name = case_paths(case_arg)[0].stem + "-min.json"
    if not out:
        return case_paths(case_arg)[0].with_name(name)
    p = Path(out)
    if p.is_dir() or out.endswith(("/", os.sep)):
        return p / name
    return p if p.suffix == ".json" else p.with_name(p.name + ".json")


def _cmd(args: argparse.Namespace) -> int:
    from harness.cases import CaseError, CaseTooNew, case_paths, load_case, print_problem, printable, tolerant_stdout
    from harness.runner.pool import WorkerPool, save_failure
    from harness.runner.replay import EXIT_CANNOT_RUN, EXIT_HARNESS, choose_device

    tolerant_stdout()
    try:
        case, tensors = load_case(args.case, max_elements=args.max_elements)
    except CaseTooNew as e:
        print_problem("minimize", f"cannot run here: {e}")
        return EXIT_CANNOT_RUN
    except CaseError as e:
        print_problem("minimize", e)
        return EXIT_HARNESS
    out = _out_path(args.case, args.out)
    taken = [p for p in case_paths(out) if os.path.lexists(p)]
    if taken and not args.force:
        print_problem("minimize", f"{taken[0]} already exists; pass --force to overwrite it, or name another --out")
        return EXIT_HARNESS
    blocking = next((q for q in out.parents if q.exists() and not q.is_dir()), None)
    if blocking is not None:
        print_problem("minimize", f"--out {out}: {blocking} is a file, not a directory; name a folder or a new file")
        return EXIT_HARNESS
    device, why = choose_device(case.env, args.device)
    if device is None:
        print_problem("minimize", f"cannot run here: {why}")
        return EXIT_CANNOT_RUN
    with WorkerPool([device], 1, case_timeout=args.timeout, attribute=False, spares=1) as pool:

        def run(c: "Case", v: dict) -> Result:
            return pool.submit(c, values=v or None).result()

        try:
            res = minimize(
                case,
                tensors,
                run,
                max_steps=args.max_steps,
                log=lambda s: print(f"  {s}", flush=True),
                max_elements=args.max_elements,
            )
        except NothingToMinimize as e:
            print_problem("minimize", e)
            if e.verdict is Verdict.UNAVAILABLE:
                return EXIT_CANNOT_RUN
            return 1 if not e.verdict.failed else EXIT_HARNESS
        res.result.device = device
        try:
            path = save_failure(res.case, res.result, out.parent, values=res.values or None, name=out.stem)
        except (OSError, CaseError) as e:
            print_problem("minimize", f"cannot write {out}: {e}")
            return EXIT_HARNESS
    print(f"verdict kept: {res.verdict.value}; {res.tried} candidates tried; removed {len(res.removed)}:")
    for what in res.removed:
        print(f"  - {printable(what)}")
    for name, spec in res.case.layouts.items():
        print(f"  {name}: {spec.describe()}")
    print(f"wrote {printable(path)}")
    print(f"replay: {printable(res.result.replay)}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``minimize``."""
    p = subparsers.add_parser(
        "minimize",
        help="shrink a failing case one layout property at a time",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("case", help="CASE.json of a failing case")
    p.add_argument(
        "--out",
        default=None,
        help="file to write the minimal case to, or a directory to put CASE-min.json in "
        "(default: CASE-min.json beside the case); an existing file needs --force",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: where the case was recorded)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per candidate before it counts as a timeout")
    p.add_argument("--max-steps", type=int, default=300, help="most candidates to try")
    from harness.cases import add_budget_argument

    add_budget_argument(p)
    p.set_defaults(func=_cmd)
