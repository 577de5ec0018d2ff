"""The regression corpus: every known defect replays with the verdict recorded for it.

CPU cases run in this process (``execute.run_case``: nothing they do can hurt it); CUDA cases run
in a fresh interpreter (``pool.run_in_fresh_process``) so a sticky device fault cannot poison the
test process, which never initialises CUDA itself (the capability is probed in a subprocess).
A case whose expectation does not hold on this machine (no GPU, older capability, another torch
range, or its target unavailable) is skipped with the reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from harness.cases import load_case
from harness.runner.execute import run_case
from harness.targets.corpus import (
    DEFAULT_CORPUS,
    CorpusEntry,
    CorpusError,
    applies_here,
    load_corpus,
    promote,
    render_readme,
)

ENTRIES = load_corpus(DEFAULT_CORPUS, check_files=False)


def _cuda_capability() -> tuple[int, int] | None:
    from harness.runner.pool import probe_cuda

    devs = probe_cuda()["devices"]
    return tuple(devs[0]["capability"]) if devs else None


def _param(e: CorpusEntry):
    marks = [pytest.mark.gpu] if e.device == "cuda" else []
    return pytest.param(e, id=e.file.removesuffix(".json"), marks=marks)


def test_index_is_valid_and_readme_in_sync() -> None:
    entries = load_corpus(DEFAULT_CORPUS, check_files=True)  # every file loads and agrees with its entry
    assert entries, "the corpus is empty"
    assert len({e.fingerprint for e in entries}) == len(entries), "two entries share a fingerprint"
    readme = (DEFAULT_CORPUS / "README.md").read_text()
    assert readme == render_readme(entries), "tests/cases/README.md is stale: rerun the promote command"
    for e in entries:
        case, _ = load_case(DEFAULT_CORPUS / e.file)
        assert case.verdict.get("verdict") == e.verdict, f"{e.file}: the file records another verdict than the index"


@pytest.mark.parametrize("entry", [_param(e) for e in ENTRIES])
def test_known_defect_keeps_its_verdict(entry: CorpusEntry) -> None:
    cap = _cuda_capability() if entry.device == "cuda" else None
    ok, why = applies_here(entry, torch_version=torch.__version__, cuda_capability=cap)
    if not ok:
        pytest.skip(why)
    path = DEFAULT_CORPUS / entry.file
    if entry.device == "cpu":
        case, tensors = load_case(path)
        result = run_case(case, "cpu", values=tensors or None)
    else:
        from harness.runner.pool import run_in_fresh_process

        result = run_in_fresh_process(path, "cuda:0", record_ops=False, timeout=300)
    if result.verdict.value == "unavailable":
        pytest.skip(f"{entry.op} cannot run here: {result.message}")
    assert result.verdict.value == entry.verdict, (
        f"{entry.file}: expected {entry.verdict} ({entry.description}), got:\n{result.format()}\n"
        "If the defect was fixed or fails differently now, update tests/cases/index.json on purpose."
    )


# ------------------------------------------------------------------------------ the corpus tooling


def _copy_one(tmp_path: Path) -> Path:
    src = DEFAULT_CORPUS / ENTRIES[0].file
    dst = tmp_path / "found" / "x.json"
    dst.parent.mkdir()
    shutil.copyfile(src, dst)
    st = src.with_suffix(".safetensors")
    if st.exists():
        shutil.copyfile(st, dst.with_suffix(".safetensors"))
    return dst


def test_promote_adds_an_entry_and_regenerates_the_readme(tmp_path) -> None:
    src = _copy_one(tmp_path)
    corpus = tmp_path / "corpus"
    e = promote(src, description="what fails", versions="torch 2.13 CPU", corpus=corpus)
    assert (corpus / e.file).exists() and (corpus / e.file).with_suffix(".safetensors").exists()
    assert e.verdict == ENTRIES[0].verdict and e.layout_class == ENTRIES[0].layout_class
    loaded = load_corpus(corpus)
    assert loaded == [e]
    assert "what fails" in (corpus / "README.md").read_text()
    promote(src, description="what fails, reworded", versions="v", corpus=corpus)  # same name: replaced
    assert [x.description for x in load_corpus(corpus)] == ["what fails, reworded"]


def test_promote_and_load_reject_bad_input_naming_it(tmp_path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        promote(tmp_path / "missing.json", description="d", versions="v", corpus=tmp_path)
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "index.json").write_text(
        json.dumps(
            {
                "schema_version": 1,
                "cases": [
                    {
                        "file": "../escape.json",
                        "op": "x",
                        "layout_class": "y",
                        "verdict": "drift",
                        "description": "d",
                        "versions": "v",
                    }
                ],
            }
        )
    )
    with pytest.raises(CorpusError, match="relative NAME.json"):
        load_corpus(corpus)
    (corpus / "index.json").write_text(
        json.dumps(
            {
                "schema_version": 1,
                "cases": [
                    {
                        "file": "a.json",
                        "op": "x",
                        "layout_class": "y",
                        "verdict": "exploded",
                        "description": "d",
                        "versions": "v",
                    }
                ],
            }
        )
    )
    with pytest.raises(CorpusError, match="unknown verdict 'exploded'"):
        load_corpus(corpus)
    (corpus / "index.json").write_text(json.dumps({"schema_version": 1, "cases": [{"file": "a.json"}]}))
    with pytest.raises(CorpusError, match="missing fields"):
        load_corpus(corpus)


@pytest.mark.parametrize(
    "entry_kw,cap,torch_v,ok,match",
    [
        ({"device": "cuda"}, None, "2.11.0", False, "no CUDA device"),
        ({"device": "cuda", "min_capability": "9.0"}, (8, 6), "2.11.0", False, ">= 9.0, found 8.6"),
        ({"device": "cuda", "min_capability": "9.0"}, (9, 0), "2.11.0", True, ""),
        ({"torch_min": "2.13"}, None, "2.11.0+cu130", False, "torch >= 2.13"),
        ({"torch_below": "2.13"}, None, "2.13.0+cpu", False, "torch < 2.13"),
        ({}, None, "2.13.0+cpu", True, ""),
    ],
)
def test_applies_here(entry_kw, cap, torch_v, ok, match) -> None:
    e = CorpusEntry(file="a.json", op="o", layout_class="c", verdict="drift", description="d", versions="v", **entry_kw)
    got, why = applies_here(e, torch_version=torch_v, cuda_capability=cap)
    assert got is ok and match in why


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"min_capability": 9.0}, "'min_capability' must be a string or null, got 9.0"),
        ({"device": ["cpu"]}, "'device' must be a non-empty string"),
        ({"description": "fine\x1b[2Jnot"}, "control characters"),
    ],
)
def test_index_fields_are_typed(tmp_path, entry, match) -> None:
    base = {"file": "a.json", "op": "x", "layout_class": "y", "verdict": "drift", "description": "d", "versions": "v"}
    (tmp_path / "index.json").write_text(json.dumps({"schema_version": 1, "cases": [{**base, **entry}]}))
    with pytest.raises(CorpusError, match=match):
        load_corpus(tmp_path, check_files=False)


def test_index_that_is_not_a_regular_file_or_too_deep_is_one_error(tmp_path) -> None:
    (tmp_path / "index.json").symlink_to("/dev/zero")
    with pytest.raises(CorpusError, match="is a device, not a corpus index"):
        load_corpus(tmp_path)
    (tmp_path / "index.json").unlink()
    (tmp_path / "index.json").write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(CorpusError, match="nests deeper than 64 levels"):
        load_corpus(tmp_path)
