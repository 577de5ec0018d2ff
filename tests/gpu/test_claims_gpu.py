"""The write-up's claims and scenarios on a GPU; with ``HARNESS_CLAIMS_OUT=DIR`` the table is kept as an artifact.

``HARNESS_CLAIMS_OUT=out/claims pytest -m gpu tests/gpu/test_claims_gpu.py`` writes
``DIR/claims.{md,html,json}`` (the section to paste into an issue thread) and the failing cases' files
under ``DIR/cases``. Each claim's verdict comes from what this GPU measured; the tests check that every
claim a CUDA device can settle was settled, that the verdict follows from its evidence, and that the
scenarios pass their emulation-derived bounds or skip with the exact reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from harness import claims as C
from harness.quant.backends import get_backend
from harness.quant.linear import scaled_mm_available
from harness.scenarios import SCENARIOS, run_scenario

pytestmark = pytest.mark.gpu


def _out(tmp_path_factory) -> Path:
    want = os.environ.get("HARNESS_CLAIMS_OUT")
    if not want:
        return tmp_path_factory.mktemp("claims")
    p = Path(want)
    if p.exists() and any(p.iterdir()):
        pytest.fail(f"HARNESS_CLAIMS_OUT={p} is not empty; point it at a new directory (nothing was overwritten)")
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.fixture(scope="module")
def claims_run(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip(f"no CUDA device: torch {torch.__version__}")
    out = _out(tmp_path_factory)
    ctx = C.ClaimContext("cuda:0", out=out, per_class=1)
    results = C.run_claims(ctx)
    scen = [run_scenario(n, "cuda:0") for n in SCENARIOS]
    from harness.env import collect_env_subprocess

    env = collect_env_subprocess()
    for fmt, name in (("md", "claims.md"), ("html", "claims.html"), ("json", "claims.json")):
        (out / name).write_text(C.format_results(results, fmt, env=env, scenarios=scen))
    print(C.format_results(results, "text", env=env, scenarios=scen))
    return {r.id: r for r in results}, scen


def _fp8_gpu() -> tuple[bool, str]:
    return scaled_mm_available("cuda:0")


def test_every_verdict_follows_from_its_evidence(claims_run) -> None:
    results, _ = claims_run
    by_id = {c.id: c for c in C.CLAIMS}
    for cid, r in results.items():
        assert r.status in (C.CONFIRMED, C.REFUTED, C.UNTESTABLE), cid
        assert r.evidence, f"{cid}: no evidence ({r.why})"
        assert by_id[cid].decide(r.evidence)[0] == r.status, cid


def test_the_metadata_claim_is_settled_on_a_poisoned_context(claims_run) -> None:
    r = claims_run[0]["metadata-read"]
    p = r.evidence["poisoned"]
    assert p.get("fault_triggered"), f"the child could not fault the GPU: {p}"
    assert r.status != C.UNTESTABLE, r.why


@pytest.mark.parametrize(
    "cid", ["contiguous-first", "flatten-contiguous", "comfyui-reference", "contiguous-free", "after-fixes"]
)
def test_fp8_claims_are_settled_on_an_fp8_gpu(claims_run, cid: str) -> None:
    ok, why = _fp8_gpu()
    if not ok:
        pytest.skip(f"FP8 matmul not available: {why}")
    r = claims_run[0][cid]
    assert r.status != C.UNTESTABLE, r.why


def test_sage3_claim_is_testable_exactly_where_the_kernel_runs(claims_run) -> None:
    r = claims_run[0]["sage3-transpose"]
    ok, why = get_backend("sage3").available("cuda:0")
    assert (r.status == C.UNTESTABLE) == (not ok), r.why
    if not ok:
        assert why in r.why and "Blackwell" in r.settle


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenarios_pass_their_bound_or_skip_with_the_reason(claims_run, name: str) -> None:
    r = next(s for s in claims_run[1] if s.name == name)
    if r.status == "skipped":
        assert r.reason.startswith("cannot run on cuda:0: ")
        pytest.skip(r.reason)
    if r.status == "fail" and r.known_defect:
        pytest.xfail(f"{name}: {r.reason}")  # the table keeps the failure; the emulation of the defect explains it
    assert r.status == "pass", f"{name}: {r.reason} ({r.operators})"
    assert r.judgement["ref_report"]["max_abs"] > 0
