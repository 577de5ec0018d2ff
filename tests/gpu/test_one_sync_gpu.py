"""The one-sync path on CUDA: a small case waits for the GPU once, plus the one transfer that brings its copies back
(several processes sharing a GPU take turns for every wait), and its Results are those of the per-call path.  Skipped without CUDA by conftest.py."""

from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch

from harness.cases import Case
from harness.layouts import LayoutSpec, materialize
from harness.matrix import _build_cells, select_targets
from harness.runner.execute import run_case
from harness.values import ValueSpec
from harness.verdicts import Verdict
from helpers import case

pytestmark = pytest.mark.gpu

STRIDED = LayoutSpec((64, 128), "float32", offset=3, pad=(0, 4))
COMPARED = ("verdict", "message", "op", "metrics", "bound", "mutated_inputs", "poison_written", "layouts")


class _Waits:
    """Counts the waits for the GPU inside it: explicit synchronizes, and the implicit ones torch's sync debug
    mode reports (a copy to pageable host memory, ``.item()``, ``nonzero``...)."""

    def __enter__(self):
        self.explicit = 0
        real = torch.cuda.synchronize

        def counting(*a, **k):
            self.explicit += 1
            return real(*a, **k)

        self._real = real
        torch.cuda.synchronize = counting
        self._w = warnings.catch_warnings(record=True)
        self.caught = self._w.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self._w.__exit__(*exc)
        torch.cuda.synchronize = self._real
        self.implicit = [  # the debug mode also reports torch.cuda.synchronize itself: counted as explicit
            f"{w.filename}:{w.lineno}"
            for w in self.caught
            if "synchroniz" in str(w.message).lower() and not w.filename.endswith(f"cuda{os.sep}__init__.py")
        ]


def test_a_small_passing_case_waits_for_the_gpu_once(monkeypatch):
    monkeypatch.delenv("HARNESS_ONE_SYNC", raising=False)
    c = Case(op="cpu.scale", layouts={"x": STRIDED}, values={"x": ValueSpec("normal", seed=1)})
    assert run_case(c, "cuda").verdict is Verdict.PASS  # warm: first-call costs, pinned blocks cached
    with _Waits() as w:
        r = run_case(c, "cuda")
    assert r.verdict is Verdict.PASS, r.format()
    # one synchronize (the health check), then one transfer of every copy; building the inputs waits not at all
    assert w.explicit == 1 and len(w.implicit) == 1, (w.explicit, w.implicit)
    monkeypatch.setenv("HARNESS_ONE_SYNC", "0")
    with _Waits() as per_call:
        assert run_case(c, "cuda").verdict is Verdict.PASS
    assert per_call.explicit + len(per_call.implicit) > 4  # the per-call path waits after every call


def test_inputs_built_on_the_host_are_the_inputs_built_on_the_gpu():
    # host values: built on the host, the storage (poison included) uploaded in one copy; values already on the
    # GPU: built there, poison and all (the path an FP8 cast still takes) -- the same bytes either way
    for spec in (STRIDED, LayoutSpec((6, 5), "bfloat16", perm=(1, 0), offset=7), LayoutSpec((4, 4), "float16")):
        values = torch.randn(spec.shape).to(spec.torch_dtype)
        uploaded = materialize(spec, values, "cuda")
        built_there = materialize(spec, values.to("cuda"), "cuda")
        assert uploaded.stride() == built_there.stride() and uploaded.storage_offset() == built_there.storage_offset()
        raw = [
            torch.empty(0, dtype=torch.uint8, device="cuda").set_(t.untyped_storage()).cpu()
            for t in (uploaded, built_there)
        ]
        assert torch.equal(*raw)


def _cuda_matrix_cases() -> list[Case]:
    """Three cells of every op of the default matrix (an op unavailable here answers ``unavailable`` twice)."""
    got: dict[str, list[Case]] = {}
    for cell in _build_cells(select_targets(None)):
        if len(got.setdefault(cell.op, [])) < 3:
            got[cell.op].append(cell.factory.build(len(got[cell.op]), size="small"))
    return [c for cs in got.values() for c in cs]


CASES = [case(op, STRIDED) for op in ("cpu.scale", "fault.mutate", "fault.poison_write", "fault.nan", "fault.layout")]
CASES += _cuda_matrix_cases()


@pytest.fixture(scope="module")
def results_by_path():
    """Every case of ``CASES`` in workers on the per-call path ("0") and on the one-sync path ("1"): a pool
    each, so that a device fault costs a worker, not this test process."""
    from harness.runner.pool import WorkerPool

    out = {}
    for mode in ("0", "1"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HARNESS_ONE_SYNC", mode)  # the workers take the environment they start with
            with WorkerPool("cuda", 2, attribute=False) as pool:
                out[mode] = pool.run(CASES)
    return out


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c.op}-{n}" for n, c in enumerate(CASES)])
def test_both_paths_give_the_same_result_on_cuda(i, results_by_path):
    per_call, one_sync = results_by_path["0"][i], results_by_path["1"][i]
    assert Verdict.ERROR not in (per_call.verdict, one_sync.verdict), (per_call.format(), one_sync.format())
    assert per_call.verdict is one_sync.verdict, (per_call.format(), one_sync.format())
    if per_call.verdict in (Verdict.DEVICE_FAULT, Verdict.WORKER_CRASH, Verdict.TIMEOUT):
        return  # which call a fault surfaced after is worded per path; the verdict is what must agree
    a, b = dataclasses.asdict(per_call), dataclasses.asdict(one_sync)
    for f in COMPARED:
        if f == "metrics" and a[f] != b[f]:
            # float64 sums on the host and on the GPU may differ in the last bits; nothing else may
            assert a[f].keys() == b[f].keys()
            for k, v in a[f].items():
                if isinstance(v, float):
                    assert v == pytest.approx(b[f][k], rel=1e-9, abs=0, nan_ok=True), (k, v, b[f][k])
                else:
                    assert v == b[f][k], (k, v, b[f][k])
            continue
        if f == "message" and a["verdict"] in (Verdict.PASS, Verdict.DRIFT):
            continue  # the message quotes those metrics
        assert a[f] == b[f], (f, a[f], b[f])


def test_a_device_fault_is_caught_at_the_one_wait_in_a_worker():
    # in a worker (a fault breaks the process): the one-sync path's single wait is the health check
    from harness.runner.pool import WorkerPool

    with WorkerPool("cuda", 1, spares=0, attribute=False) as pool:
        r = pool.run_one(case("fault.device_assert", LayoutSpec((8,), "float32")))
        after = pool.run_one(case("cpu.scale", STRIDED))
    assert r.verdict is Verdict.DEVICE_FAULT, r.format()
    assert after.verdict is Verdict.PASS, after.format()
