"""harness.explore: each operand its own axis, sizes at tile boundaries, large offsets, the search loop.

The layout tests build real inputs through the targets (``make_inputs`` on CPU) and check the
tensors themselves -- pointers, strides, storage -- not the specs the code under test wrote.
The search tests use a fake runner whose verdict depends on one property.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings

from harness.cases import Case
from harness.explore import (
    LARGE_OFFSET,
    Genome,
    Perturbation,
    ValuePick,
    build_case,
    draw_genome,
    explore,
    kernel_coverage,
    large_offset_plan,
    size_class,
)
from harness.layouts import LayoutSpec
from harness.runner.execute import run_case
from harness.runner.targets import get_target
from harness.strategies import explored_cases
from harness.verdicts import Result, Verdict

ATT = get_target("attn.emu.naive")
LIN = get_target("fp8_linear")
ATT_SIZES = (("batch", 1), ("head_dim", 64), ("heads", 1), ("layout", "HND"), ("seq_k", 16), ("seq_q", 16))
LIN_SIZES = (("batch", 1), ("k", 64), ("n", 32), ("rank", 2), ("tokens", 8))


def _inputs(target, *perts: Perturbation, sizes=ATT_SIZES, values=()):
    built = build_case(target, Genome(sizes, perts, values, seed=3))
    return built, target.make_inputs(built.case, "cpu")


def _plain(t: torch.Tensor) -> bool:
    return (
        t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


def test_one_operand_is_perturbed_and_the_others_stay_plain() -> None:
    built, x = _inputs(ATT, Perturbation("v", "align", (2,)))
    assert x["v"].data_ptr() % 4 == 2 and x["v"].is_contiguous()
    assert _plain(x["q"]) and _plain(x["k"])
    assert built.case.note == "explored: v: pointer aligned to 2 B"
    assert run_case(built.case, "cpu").verdict is Verdict.PASS  # the runner materializes and judges it


def test_stride_zero_and_size_one_strides_on_any_dim() -> None:
    built, x = _inputs(ATT, Perturbation("k", "broadcast", (-2,)), Perturbation("q", "step", (-3, 2)))
    assert x["k"].stride(2) == 0 and x["k"].shape[2] == 16
    assert x["q"].shape[1] == 1 and x["q"].stride(1) == 2 * 16 * 64  # a size-1 dim off its packed stride
    assert x["q"].is_contiguous(), "torch ignores size-1 dims: only the explicit stride shows it"
    props = [p.prop(built.case.layouts[p.operand], built.axes[p.operand]) for p in built.genome.perturbations]
    assert props == ["k: stride 0 on dim 2 (token)", "q: non-packed stride on dim 1 (head) (size 1)"]


def test_transposes_padding_and_packed_views() -> None:
    _, x = _inputs(
        ATT,
        Perturbation("q", "perm", (0, 1, 3, 2)),
        Perturbation("k", "pad", (-1, 8)),
        Perturbation("v", "packed", (-1, 3, 2)),
    )
    assert x["q"].stride(-1) != 1
    assert x["k"].stride(2) == 64 + 8
    assert x["v"].stride(2) == 3 * 64 and x["v"].storage_offset() == 2 * 64  # chunk 2 of a (.., 3 x 64) buffer


def test_linear_weight_as_a_checkpoint_view_and_a_k_slice_of_the_input() -> None:
    _, x = _inputs(
        LIN, Perturbation("weight", "checkpoint", (1235,)), Perturbation("x", "slice", (-1, 3, 16)), sizes=LIN_SIZES
    )
    w = x["weight"]
    assert w.dtype == torch.float8_e4m3fn and w.storage_offset() == 1235 and w.data_ptr() % 2 == 1
    assert w.untyped_storage().nbytes() > 1235 + w.numel()  # a view into a larger buffer, slack after it
    assert x["x"].stride(0) == 64 + 16 and x["x"].storage_offset() == 3


def test_a_scalar_scale_becomes_an_operand_with_its_value() -> None:
    built, x = _inputs(LIN, Perturbation("weight_scale", "align", (4,)), sizes=LIN_SIZES)
    s = x["weight_scale"]
    assert s.shape == () and s.dtype == torch.float32 and float(s) == LIN.weight_scale
    assert s.data_ptr() % 8 == 4 and built.case.params["weight_scale"] is None
    assert run_case(built.case, "cpu").verdict is Verdict.PASS


def test_what_does_not_fit_is_dropped_and_said() -> None:
    built, _ = _inputs(
        ATT, Perturbation("q", "align", (1,)), Perturbation("q", "perm", (1, 0)), Perturbation("nope", "align", (2,))
    )
    assert built.genome.perturbations == ()
    assert len(built.skipped) == 3 and "1 B alignment is impossible for 2-byte elements" in built.skipped[0]


def test_structured_values_follow_the_operands_axes() -> None:
    _, x = _inputs(
        ATT,
        sizes=ATT_SIZES[:3] + (("layout", "NHD"),) + ATT_SIZES[4:],
        values=(ValuePick("k", "zero_slice", "channel", (("start", 5),)),),
    )
    k = x["k"]  # NHD: channel is dim 3
    assert (k[..., 5] == 0).all() and (k[..., 4] != 0).any()


def test_genomes_and_cases_round_trip_through_json() -> None:
    g = Genome(LIN_SIZES, (Perturbation("bias", "align", (8,)),), (ValuePick("x", "outlier_slice", "token"),), 9)
    assert Genome.from_dict(g.to_dict()) == g
    case = build_case(LIN, g).case
    again = Case.from_dict(case.to_dict())
    assert again.layouts == case.layouts and again.values == case.values
    assert again.params["explore"] == g.to_dict() and again.params["layout_class"] == "explore"


def test_draws_are_seeded_and_perturb_each_operand_on_its_own() -> None:
    a = [draw_genome(random.Random(7), ATT) for _ in range(3)]
    assert a == [draw_genome(random.Random(7), ATT) for _ in range(3)]
    rng = random.Random(1)
    draws = [draw_genome(rng, ATT) for _ in range(400)]
    alone = {next(iter(g.operands())) for g in draws if len({p.operand for p in g.perturbations}) == 1 and not g.values}
    assert alone == {"q", "k", "v"}
    kinds = {(p.operand, p.kind) for g in draws for p in g.perturbations}
    assert {k for o, k in kinds if o == "v"} >= {
        "align",
        "checkpoint",
        "step",
        "broadcast",
        "perm",
        "pad",
        "packed",
        "slice",
    }
    assert {p.args[0] for g in draws for p in g.perturbations if p.kind == "align"} == {1, 2, 4, 8, 16}


def test_sizes_sit_at_tile_boundaries() -> None:
    rng = random.Random(2)
    lin = [dict(draw_genome(rng, LIN, max_elements=1 << 16).sizes) for _ in range(200)]
    att = [dict(draw_genome(rng, ATT, max_elements=1 << 16).sizes) for _ in range(200)]
    ks = {s["k"] for s in lin}
    assert any(k % 64 for k in ks) and {63, 65} & ks and 128 in ks
    assert {s["tokens"] for s in lin} >= {1, 16, 17}
    dims = {s["head_dim"] for s in att}
    assert {64, 96, 128} <= dims and dims - set(ATT.head_dims) - {96}, "an unsupported head dim is drawn too"
    assert {s["batch"] for s in att} >= {1, 2} and {s["heads"] for s in att} >= {1, 2}
    assert {s["seq_q"] for s in att} & {15, 17, 63, 65, 127, 129}
    assert size_class(96) == "a multiple of 32, not of 64" and size_class(65) == "not a multiple of 16"


def test_a_large_offset_draw_reaches_2_31_and_is_sized_from_free_memory() -> None:
    spec = LayoutSpec((2, 4, 64, 64), "bfloat16", offset=3, step=(1, 1, 1, 2))
    moved, why = large_offset_plan(spec, free_bytes=1 << 40)
    assert why == "" and moved is not None
    last = moved.storage_offset() + sum((s - 1) * st for s, st in zip(moved.shape, moved.strides()))
    assert LARGE_OFFSET <= last < LARGE_OFFSET + 16 and moved.alignment() == spec.alignment() == 2
    assert moved.strides() == spec.strides()
    need = 3 * moved.storage_numel() * 2
    small, why = large_offset_plan(spec, free_bytes=need - 1)
    assert small is None and why.startswith(f"a largest element offset of {LARGE_OFFSET} needs {need / 2**30:.1f} GiB")
    assert "GiB free" in why
    unknown, why = large_offset_plan(spec, free_bytes=None)
    assert unknown is None and "free memory is unknown" in why
    built = build_case(ATT, Genome(ATT_SIZES, (Perturbation("k", "large_offset"),), seed=1))  # CPU: skipped
    assert built.genome.perturbations == () and "free memory is unknown" in built.skipped[0]


# ------------------------------------------------------------------------------ the search, with a fake runner
def _k_broadcast_on_tokens(case: Case) -> bool:
    return case.layouts["k"].strides()[2] == 0


def _fake(seen: list[float]):
    def run(case: Case) -> Result:
        ratio = case.layouts["q"].shape[2] / 300  # bigger sequences drift more, never past the bound
        seen.append(ratio)
        if _k_broadcast_on_tokens(case):
            return Result(Verdict.DRIFT, "drift", op=case.op, metrics={"ratio": 5.0})
        return Result(Verdict.PASS, "", op=case.op, metrics={"ratio": ratio})

    return run


def test_the_search_finds_a_one_operand_property_and_reports_it_once() -> None:
    seen: list[float] = []
    res = explore(ATT, _fake(seen), seed=2, budget_cases=150, max_elements=1 << 14)
    assert res.cases == 150 and len(seen) == res.cases + res.minimize_runs
    assert res.signatures() == [(ATT.name, "drift", "k", "k: stride 0 on dim 2 (token)")], res.summary()
    f = res.findings[0]
    assert f.count == res.verdicts["drift"]
    assert f.minimal["layouts"]["q"] == {"shape": f.minimal["layouts"]["q"]["shape"], "dtype": "bfloat16"}
    assert f.minimal["layouts"]["k"]["broadcast"] == [2]
    assert res.worst["ratio"] == 5.0
    d = res.to_dict()
    assert d["findings"][0]["property"] == "k: stride 0 on dim 2 (token)"


def test_a_stop_request_ends_the_search_and_the_finds_so_far_are_still_reported() -> None:
    seen: list[float] = []
    results: list[tuple[str, str]] = []
    ran = explore(ATT, _fake([]), seed=2, budget_cases=150, max_elements=1 << 14)
    first_find = next(i for i, v in enumerate(_verdicts_in_order(ran)) if v == "drift")
    n = first_find + 3  # stop a little after the first find: mid-way through what its minimization would run
    res = explore(
        ATT,
        _fake(seen),
        seed=2,
        budget_cases=150,
        max_elements=1 << 14,
        on_result=lambda b, r: results.append((b.case.note, r.verdict.value)),
        should_stop=lambda: "deadline" if len(seen) >= n else "",
    )
    assert res.stopped == "deadline" and len(seen) == n  # no case ran after the stop
    assert len(results) == n and res.cases + res.minimize_runs == n  # the hook saw every case that ran
    assert [s[1] for s in res.signatures()] == ["drift"] and res.findings[0].count >= 1
    assert "k" in res.findings[0].operand.split("+")  # the raw draw: k and maybe more (not reduced: stopped)


def _verdicts_in_order(res) -> list[str]:
    out: list[str] = []
    explore(
        ATT,
        lambda c: (lambda r: (out.append(r.verdict.value), r)[1])(_fake([])(c)),
        seed=res.seed,
        budget_cases=res.cases,
        max_elements=1 << 14,
        minimize=False,
    )
    return out


def test_the_score_is_the_worst_drift_ratio_seen() -> None:
    seen: list[float] = []
    res = explore(
        ATT,
        lambda c: _fake(seen)(c) if not _k_broadcast_on_tokens(c) else Result(Verdict.PASS, "", metrics={"ratio": 0.0}),
        seed=1,
        budget_cases=60,
        max_elements=1 << 14,
    )
    assert res.findings == [] and res.worst["ratio"] == max(seen)


def test_budgets_unavailable_and_benign_rejections() -> None:
    res = explore(ATT, _fake([]), seed=0, budget_cases=50, budget_s=1e-9)
    assert res.stopped == "budget_s" and res.cases == 1
    res = explore(ATT, lambda c: Result(Verdict.UNAVAILABLE, "no such kernel here"), budget_cases=50)
    assert res.stopped == "unavailable: no such kernel here" and res.cases == 1

    def rejected(c):
        return Result(Verdict.REJECTED, "nope") if c.note != "explored: the plain case" else Result(Verdict.PASS, "")

    assert explore(ATT, rejected, budget_cases=30).findings == []  # a raw kernel may refuse cleanly
    safe = get_target("safe_attn.emu.naive")
    assert safe.accepts_all_layouts and explore(safe, rejected, budget_cases=30).findings
    with pytest.raises(ValueError, match="budget_cases=0 must be an integer >= 1"):
        explore(ATT, _fake([]), budget_cases=0)


def test_the_coverage_key_is_pluggable_and_the_gpu_hook_reads_kernel_names() -> None:
    calls = []

    def cov(built, result):
        calls.append(built.genome)
        return 0  # one key: only the first pass and the first drift are new

    res = explore(ATT, _fake([]), seed=4, budget_cases=40, coverage=cov, max_elements=1 << 14)
    assert len(calls) == res.cases
    built = build_case(ATT, Genome(ATT_SIZES, seed=1))
    r = Result(Verdict.PASS, "", metrics={"kernels": ["flash_fwd_kernel", "flash_fwd_kernel", "cast"]})
    assert kernel_coverage(built, r) == ("kernels", "cast", "flash_fwd_kernel")
    assert kernel_coverage(built, Result(Verdict.PASS, "")) == ((), ())


@settings(max_examples=15, deadline=None, database=None)
@given(case=explored_cases(ATT, max_elements=1 << 12))
def test_the_hypothesis_strategy_gives_cases_whose_genome_rebuilds_them(case: Case) -> None:
    again = build_case(ATT, Genome.from_dict(case.params["explore"])).case
    assert again.layouts == case.layouts and again.values == case.values  # what a case file needs to replay
    inputs = ATT.make_inputs(case, "cpu")
    assert {n: tuple(t.stride()) for n, t in inputs.items()} == {n: s.strides() for n, s in case.layouts.items()}


def test_a_large_offset_draw_on_cpu_is_skipped_with_its_reason() -> None:
    res = explore(ATT, _fake([]), seed=0, budget_cases=300, large_offset=True, max_elements=1 << 12)
    entry = res.skipped["large_offset"]
    assert entry["count"] >= 1 and "free memory is unknown" in entry["example"]
    assert not any(p["kind"] == "large_offset" for f in res.findings for p in f.genome["perturbations"])
    assert res.skipped["align"]["example"].endswith("1 B alignment is impossible for 2-byte elements")


def test_an_explored_case_stands_for_a_corpus_finding_by_op_verdict_and_property_family() -> None:
    from harness.explore import CLASS_FAMILIES, reproduces
    from harness.targets.corpus import DEFAULT_CORPUS, load_corpus
    from harness.targets.layout_classes import ATTENTION_CLASSES, LINEAR_CLASSES

    drift = Result(Verdict.DRIFT, "x")
    k0, _ = _inputs(ATT, Perturbation("k", "broadcast", (-2,)))
    v2, _ = _inputs(ATT, Perturbation("v", "align", (2,)))
    v16, _ = _inputs(ATT, Perturbation("v", "align", (16,)))
    plain, _ = _inputs(ATT, sizes=tuple((k, 64 if k.startswith("seq") else v) for k, v in ATT_SIZES))
    short, _ = _inputs(ATT, sizes=tuple((k, {"seq_k": 77, "seq_q": 64}.get(k, v)) for k, v in ATT_SIZES))
    op = ATT.name
    assert not reproduces(op, "broadcast", "drift", k0, drift)  # the linear grid's class: x alone is swept
    x0, _ = _inputs(LIN, Perturbation("x", "broadcast", (-2,)), sizes=LIN_SIZES)
    b0, _ = _inputs(LIN, Perturbation("bias", "broadcast", (-1,)), sizes=LIN_SIZES)
    assert reproduces(LIN.name, "broadcast", "drift", x0, drift)
    assert b0.genome.perturbations and not reproduces(LIN.name, "broadcast", "drift", b0, drift)  # another defect
    assert not reproduces(op, "misaligned_ptr_2", "drift", x0, drift)
    assert reproduces(op, "misaligned_ptr_2", "drift", v2, drift)
    assert not reproduces(op, "misaligned_ptr_2", "drift", v16, drift)  # 16 B aligned: not the family
    assert reproduces(op, "seq_77", "drift", short, drift) and not reproduces(op, "seq_77", "drift", plain, drift)
    assert reproduces(op, "hnd_contiguous", "drift", plain, drift)
    assert not reproduces(op, "hnd_contiguous", "nonfinite", plain, drift)  # another verdict
    assert not reproduces("attn.other", "hnd_contiguous", "drift", plain, drift)  # another op
    # every layout class of the grid and of the corpus has its family decided (a new class must choose)
    grid = set(LINEAR_CLASSES) | set(ATTENTION_CLASSES)
    corpus = {e.layout_class for e in load_corpus(DEFAULT_CORPUS)}
    assert grid | corpus <= set(CLASS_FAMILIES), sorted((grid | corpus) - set(CLASS_FAMILIES))


def test_a_guarded_op_refusing_an_undeclared_head_dim_is_no_find() -> None:
    safe = get_target("safe_attn.emu.naive")
    assert safe.accepts_all_layouts and 32 not in safe.head_dims

    def refuses_32(c: Case) -> Result:
        hd = c.layouts["q"].shape[-1]
        return Result(Verdict.REJECTED, "head_dim 32 unsupported") if hd == 32 else Result(Verdict.PASS, "")

    res = explore(safe, refuses_32, seed=0, budget_cases=400)
    assert res.verdicts.get("rejected", 0) > 0 and res.findings == [], res.summary()  # drawn, refused, honest

    def refuses_64(c: Case) -> Result:  # a head dim it declares: the guard failed its job
        hd = c.layouts["q"].shape[-1]
        return Result(Verdict.REJECTED, "head_dim 64 refused") if hd == 64 else Result(Verdict.PASS, "")

    assert explore(safe, refuses_64, seed=0, budget_cases=60, max_elements=1 << 14).findings
