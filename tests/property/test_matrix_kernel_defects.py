"""A drift that a named kernel defect explains is reported as such, not as a new failure."""

from __future__ import annotations

import pytest

from harness.cases import Case
from harness.layouts import LayoutSpec
from harness.matrix import Cell, aggregate, find_new_failures
from harness.values import ValueSpec
from harness.verdicts import INPUT_MUTATION_PREFIX, Result, Verdict, mutations_from_message


def _cell(op: str, s_k: int) -> Cell:
    specs = {n: LayoutSpec((1, 2, s_k if n != "q" else 64, 64), "bfloat16") for n in "qkv"}
    case = Case(
        op=op,
        layouts=specs,
        values={n: ValueSpec("normal", 1) for n in "qkv"},
        params={"tensor_layout": "HND", "layout_class": "hnd_contiguous"},
    )
    cell = Cell(op=op, kind="attention", layout_class="hnd_contiguous")
    cell.add(
        case,
        Result(
            Verdict.DRIFT, "max_abs 0.08 > allowed 0.02", op=op, metrics={"err": 0.08, "allowed": 0.02, "ratio": 4.0}
        ),
    )
    return cell


@pytest.mark.parametrize(
    "op,s_k,explained",
    [
        ("safe_attn.sage1.sageattn", 100, True),  # 100 % 64 = 36: SageAttention 1's short last key tile
        ("attn.sage1.sageattn_varlen", 257, True),
        ("safe_attn.sage1.sageattn", 128, False),  # whole tiles: a drift here is unexplained
        ("safe_attn.sdpa.flash", 100, False),  # not a SageAttention kernel
        ("attn.emu.sage1", 100, False),  # the emulation has no such defect
    ],
)
def test_kernel_defect_explains_drift(tmp_path, op: str, s_k: int, explained: bool) -> None:
    row = aggregate([_cell(op, s_k)], tmp_path, known=set(), save_examples=False)["cells"][0]
    assert row["failing"] == ["drift"]
    new = find_new_failures([row], known=set())
    if explained:
        assert "short last key tile" in row["kernel_defects"]["drift"]
        assert row["known"] == ["drift"] and row["new"] == [] and new == []
    else:
        assert row["kernel_defects"] == {} and row["new"] == ["drift"] and len(new) == 1


def _mutation_cell(op: str, message: str) -> Cell:
    cell = _cell(op, 128)
    case = cell.examples["drift"][0]
    cell = Cell(op=op, kind="attention", layout_class="packed_qkv")
    written, poison = mutations_from_message(message)  # the record the worker sends with such a message
    cell.add(case, Result(Verdict.INPUT_MUTATION, message, op=op, mutated_inputs=written, poison_written=poison))
    return cell


K_ONLY = INPUT_MUTATION_PREFIX + "k: 8192 of its 8192 values changed (first at index [0, 0, 0, 0])"


@pytest.mark.parametrize(
    "op,message,explained",
    [
        ("attn.sage1.sageattn", K_ONLY, True),  # smooth_k: k -= mean, in place, any layout
        ("attn.sage1.sageattn_varlen", K_ONLY, True),
        ("attn.sage3", K_ONLY, True),  # declared by its backend too (modifies_inputs)
        ("safe_attn.sage1.sageattn", K_ONLY, False),  # safe_attention must protect the caller
        ("attn.sdpa.flash", K_ONLY, False),
        (
            "attn.sage1.sageattn",
            INPUT_MUTATION_PREFIX + "q: 3 of its 8192 values changed (first at index [0, 0, 0, 1])",
            False,
        ),  # not the known defect: q was written
        ("attn.sage1.sageattn", K_ONLY + "; v: 1 byte(s) of storage outside the view (the poison) were written", False),
        ("attn.sage1.sageattn", "k: storage outside the view (the poison) was written", False),
        (
            "attn.sage1.sageattn",
            INPUT_MUTATION_PREFIX + "k: 2 byte(s) of storage outside the view (the poison) were written",
            False,
        ),  # a declared input, but outside its view: another defect
    ],
)
def test_kernel_defect_explains_a_declared_input_write(tmp_path, op: str, message: str, explained: bool) -> None:
    row = aggregate([_mutation_cell(op, message)], tmp_path, known=set(), save_examples=False)["cells"][0]
    assert row["failing"] == ["input_mutation"]
    if explained:
        assert "writes its k input in place" in row["kernel_defects"]["input_mutation"]
        assert row["new"] == [] and find_new_failures([row], known=set()) == []
    else:
        assert row["kernel_defects"] == {} and row["new"] == ["input_mutation"]


# ---- the rule as data: the target's own method reads the worker's record, never the message


def _case(op: str, s_k: int) -> Case:
    return _cell(op, s_k).examples["drift"][0]


@pytest.mark.parametrize(
    "op,mutated,poison,explained",
    [
        ("attn.sage1.sageattn", ["k"], [], True),
        ("attn.sage3", ["k"], [], True),
        ("attn.sage1.sageattn", ["k"], ["k"], False),  # k's values and the storage around its view
        ("attn.sage1.sageattn", ["k", "v"], [], False),  # v is not declared
        ("attn.sage1.sageattn", ["q"], [], False),
        ("safe_attn.sage1.sageattn", ["k"], [], False),  # the guard must copy k first
        ("attn.sdpa.flash", ["k"], [], False),
        ("attn.sage1.sageattn", [], [], False),  # no record, whatever the message says
    ],
)
def test_the_targets_known_defect_reads_the_mutation_record(op, mutated, poison, explained) -> None:
    from harness.targets import get_target, known_defect_of

    case = _case(op, 128)
    r = Result(Verdict.INPUT_MUTATION, K_ONLY, op=op, mutated_inputs=mutated, poison_written=poison)
    why = get_target(op).known_defect(case, r)
    assert bool(why) is explained and known_defect_of(case, r) == why
    if explained:
        assert why.startswith(f"{op.split('.', 1)[1]} writes its k input in place")


@pytest.mark.parametrize(
    "op,s_k,explained",
    [
        ("attn.sage1.sageattn", 100, True),
        ("safe_attn.sage1.sageattn_varlen", 257, True),
        ("attn.sage1.sageattn", 128, False),
        ("attn.emu.sage1", 100, False),
        ("attn.sdpa", 100, False),
    ],
)
def test_the_targets_known_defect_names_the_short_key_tile(op, s_k, explained) -> None:
    from harness.targets import get_target

    why = get_target(op).known_defect(_case(op, s_k), Result(Verdict.DRIFT, "", op=op))
    assert bool(why) is explained
    if explained:
        assert f"s_k % 64 = {s_k % 64}" in why
    assert get_target(op).known_defect(_case(op, s_k), Result(Verdict.NONFINITE, "", op=op)) is None


def test_targets_without_named_defects_explain_nothing() -> None:
    from harness.targets import get_target, known_defect_of

    case = Case(op="cpu.scale", layouts={"x": LayoutSpec((4, 8), "float32")})
    r = Result(Verdict.INPUT_MUTATION, "", op="cpu.scale", mutated_inputs=["x"])
    assert get_target("cpu.scale").known_defect(case, r) is None
    assert get_target("fp8_linear").known_defect(case, r) is None
    assert known_defect_of(Case(op="no.such.target", layouts={}), r) is None
