"""Every op target through its layout classes on the GPU, in worker processes.

One sweep (module fixture) runs ``CASES`` (``$HARNESS_GPU_SWEEP_CASES``, default 1) cases of every (target, layout class) cell through a
:class:`~harness.runner.pool.WorkerPool` on ``cuda`` (a sticky fault kills a worker, never this
process, which does not initialise CUDA); the tests below assert on slices of it:

- every target that can run here passes its plain-layout control classes (raw SageAttention
  kernels excepted: they write ``k -= mean(k)`` into the caller's ``k``, so raw they are
  ``input_mutation`` -- the registry's documented behaviour, checked here);
- the layout-safe ops (``fp8_linear``, ``safe_attn.*``) pass in *every* class;
- the raw kernels show the layout facts measured on an H200 (docs/gpu-findings.md);
- no cell ends in a harness ``error``.
"""

from __future__ import annotations

import collections
import os

import pytest

from harness.matrix import is_failure
from harness.targets import all_targets
from harness.verdicts import Result, Verdict

pytestmark = pytest.mark.gpu

#: cases per (target, class) cell; raise for a nightly sweep
CASES = int(os.environ.get("HARNESS_GPU_SWEEP_CASES", "1"))
CONTROL = {"linear": ("contiguous", "2d", "3d"), "attention": ("hnd_contiguous", "nhd_contiguous")}


@pytest.fixture(scope="module")
def capability() -> tuple[int, int]:
    from harness.runner.pool import probe_cuda

    devs = probe_cuda()["devices"]
    if not devs:
        pytest.skip("no CUDA device")
    return tuple(devs[0]["capability"])


@pytest.fixture(scope="module")
def sweep(capability) -> dict[tuple[str, str], list]:
    """(target, class) -> [Result, ...] for every matrix target on cuda:0."""
    from harness.runner.pool import WorkerPool

    futures = collections.defaultdict(list)
    with WorkerPool("cuda:0", workers_per_device=1, case_timeout=180) as pool:
        for name, t in all_targets().items():
            if t.kind not in CONTROL:
                continue
            for cls, f in t.layout_classes().items():
                for i in range(CASES):
                    case = f.build(i)
                    futures[(name, cls)].append((case, pool.submit(case)))
        out = {}
        for key, pairs in futures.items():
            out[key] = []
            for case, fut in pairs:
                r = fut.result()
                # the kernel defect (not a layout one) a drift on this case would be
                r.known_defect = all_targets()[key[0]].known_defect(case, Result(Verdict.DRIFT, op=key[0]))
                out[key].append(r)
        return out


def _expected(name: str, r, default: str) -> str:
    """A case that hits a known kernel defect must still show it (drift): it has not silently changed."""
    return "drift" if getattr(r, "known_defect", None) else default


def _available(sweep, name: str) -> bool:
    return not any(r.verdict.value == "unavailable" for (n, _), rs in sweep.items() if n == name for r in rs)


def _show(rs) -> str:
    return "\n".join(r.format() for r in rs if r.verdict.value != "pass")[:6000]


def test_the_sweep_covered_the_gpu_targets(sweep, capability) -> None:
    ran = {n for (n, _), rs in sweep.items() if all(r.verdict.value != "unavailable" for r in rs)}
    must = {
        "fp8_linear",
        "raw.scaled_mm",
        "attn.sdpa",
        "attn.sdpa.math",
        "attn.sdpa.efficient",
        "safe_attn.sdpa.efficient",
        "legacy.comfyui",
    }
    if capability >= (8, 0):
        must |= {"attn.sdpa.flash", "safe_attn.sdpa.flash"}
    assert must <= ran, f"not run on this GPU: {sorted(must - ran)}"


def test_no_harness_errors_or_lost_workers(sweep) -> None:
    bad = [(k, r) for k, rs in sweep.items() for r in rs if r.verdict.value in ("error", "worker_crash")]
    assert not bad, "\n".join(f"{k}: {r.format()}" for k, r in bad[:10])


def test_every_target_passes_its_control_classes(sweep) -> None:
    problems = []
    for (name, cls), rs in sweep.items():
        t = all_targets()[name]
        if cls not in CONTROL[t.kind] or not _available(sweep, name):
            continue
        # raw kernels whose backend declares it writes an input (Sage 1/3: k -= mean(k)) must show it
        want = "input_mutation" if getattr(t, "declared_writes", tuple)() else "pass"
        wants = [want if want != "pass" else _expected(name, r, want) for r in rs]
        got = [r.verdict.value for r in rs]
        if got != wants:
            problems.append(f"{name} x {cls}: expected {wants}, got {got}\n{_show(rs)}")
    assert not problems, "\n\n".join(problems)


def test_layout_safe_ops_accept_every_class(sweep) -> None:
    problems = []
    for (name, cls), rs in sweep.items():
        t = all_targets()[name]
        if not getattr(t, "accepts_all_layouts", False) or not _available(sweep, name):
            continue
        bad = [r for r in rs if is_failure(r.verdict.value, True) and r.verdict.value != _expected(name, r, "pass")]
        if bad:
            problems.append(f"{name} x {cls}: {[r.verdict.value for r in bad]}\n{_show(bad)}")
    assert not problems, "\n\n".join(problems)


#: what the facts below were measured with (docs/gpu-findings.md: one H200, torch 2.11.0+cu130, cuDNN 9.19.0)
MEASURED_WITH = {"capability": "9.0", "torch": "2.11", "cuda": "13.0", "cudnn": "9.19"}
#: the parts of the stack a fact depends on
CUBLAS = ("capability", "torch", "cuda")  # torch._scaled_mm -> cuBLASLt's FP8 heuristics
TORCH_KERNEL = ("capability", "torch")  # a kernel torch ships (flash, memory-efficient, the FP8 cast)
CUDNN = ("capability", "torch", "cudnn")
EVERYWHERE = ()  # composite aten ops or Python: no kernel of this stack decides it

#: (target, class) -> (verdict, what it depends on); checked wherever those parts match MEASURED_WITH
LAYOUT_FACTS = {
    ("raw.scaled_mm", "offset_1"): ("rejected", CUBLAS),  # CUBLAS_STATUS_NOT_SUPPORTED, context healthy
    ("raw.scaled_mm", "offset_8"): ("rejected", CUBLAS),
    ("raw.scaled_mm", "offset_16"): ("pass", CUBLAS),
    ("raw.scaled_mm", "padded_rows"): ("rejected", CUBLAS),  # odd leading dimension
    ("raw.scaled_mm", "transposed"): ("rejected", ("torch",)),  # torch's own check: A must be row-major
    ("attn.sdpa.flash", "misaligned_ptr_2"): ("device_fault", TORCH_KERNEL),  # sticky 'misaligned address'
    ("attn.sdpa.flash", "misaligned_ptr_8"): ("device_fault", TORCH_KERNEL),
    ("attn.sdpa.efficient", "misaligned_ptr_2"): ("rejected", TORCH_KERNEL),  # 'p.query_ptr is not correctly aligned'
    ("attn.sdpa.efficient", "misaligned_ptr_8"): ("device_fault", TORCH_KERNEL),
    # no error, but the kernel reads outside the view: the NaN poison around it reaches the output
    ("attn.sdpa.cudnn", "misaligned_ptr_2"): ("nonfinite", CUDNN),
    ("attn.sdpa.cudnn", "misaligned_ptr_8"): ("nonfinite", CUDNN),
    ("attn.sdpa.math", "misaligned_ptr_8"): ("pass", EVERYWHERE),
    ("legacy.wanvideo_late2025", "values_beyond_448"): ("input_mutation", EVERYWHERE),  # clamps x in place
    # x / scale_input cast to E4M3 unclamped: torch 2.11's CUDA cast gives NaN from 480 up
    ("legacy.comfyui.scaled_input", "values_beyond_448"): ("nonfinite", TORCH_KERNEL),
    ("legacy.user_fixed.scaled_input", "values_beyond_448"): ("nonfinite", TORCH_KERNEL),
}


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _stack_here(capability: tuple[int, int]) -> dict[str, str]:
    """This machine's values of the keys of MEASURED_WITH."""
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if cudnn is None:
        cudnn_v = "none"
    elif cudnn >= 90000:  # cuDNN 9 encodes major * 10000 + minor * 100 + patch
        cudnn_v = f"{cudnn // 10000}.{cudnn % 10000 // 100}"
    else:  # cuDNN 8: major * 1000 + minor * 100 + patch
        cudnn_v = f"{cudnn // 1000}.{cudnn % 1000 // 100}"
    return {
        "capability": f"{capability[0]}.{capability[1]}",
        "torch": _major_minor(torch.__version__),
        "cuda": _major_minor(torch.version.cuda or "none"),
        "cudnn": cudnn_v,
    }


@pytest.mark.parametrize("cell", sorted(LAYOUT_FACTS), ids=lambda c: f"{c[0]}-{c[1]}")
def test_raw_kernel_layout_facts(sweep, capability, cell) -> None:
    want, depends = LAYOUT_FACTS[cell]
    here = _stack_here(capability)
    other = [f"{k} {MEASURED_WITH[k]} (here {here[k]})" for k in depends if here[k] != MEASURED_WITH[k]]
    if other:
        pytest.skip(
            f"{cell[0]} x {cell[1]} was measured with {', '.join(other)}: measure it here "
            "(scripts/gpu_probe.py, the matrix) and add the facts"
        )
    rs = sweep[cell]
    if any(r.verdict.value == "unavailable" for r in rs):
        pytest.skip(f"{cell[0]} unavailable: {rs[0].message}")
    assert [r.verdict.value for r in rs] == [want] * len(rs), _show(rs)
    if want == "device_fault":
        assert all(r.attribution for r in rs), "device faults must come with an attribution"
