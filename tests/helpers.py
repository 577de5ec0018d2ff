"""Helpers shared by the test modules (importable as ``helpers``: ``tests/conftest.py`` puts ``tests/`` on the path).

- :func:`case`: a one-input case for the CPU / fault test doubles (``x`` in a given layout, normal values).
- :func:`kernel_bound`: how far an FP8 ``_scaled_mm`` kernel may sit from the emulation on the same operands.
- :func:`restored_registry`: undo the target registrations made inside it (every test runs in one).
- :func:`hard_permutation_attention`: attention inputs whose exact answer is known without computing attention.
- :func:`run_at_once`: independent commands started together (the second core works while pytest waits on one).
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from harness.cases import Case
from harness.layouts import LayoutSpec
from harness.reference.metrics import Bound, scaled_mm_kernel_bound
from harness.targets import load_targets
from harness.targets.protocol import all_targets, register_target, unregister_target
from harness.values import ValueSpec

__all__ = [
    "ALLOCATOR_SLACK",
    "PLAIN",
    "case",
    "hard_permutation_attention",
    "kernel_bound",
    "restored_registry",
    "run_at_once",
]

#: the plain (4, 8) float32 layout the runner's tests use by default
PLAIN = LayoutSpec((4, 8), "float32")
#: CUDA's caching allocator rounds every block up to a multiple of 512 bytes; at most a few dozen tensors
#: are alive at once inside the reference attention()
ALLOCATOR_SLACK = 64 * 512


def case(op: str, spec: LayoutSpec = PLAIN, seed: int = 1, **params: Any) -> Case:
    """A case of ``op`` with one input ``x`` laid out as ``spec``, values ``normal`` seeded ``seed``."""
    return Case(op=op, layouts={"x": spec}, values={"x": ValueSpec("normal", seed=seed)}, params=params)


@contextlib.contextmanager
def restored_registry() -> Iterator[None]:
    """Put the target registry back as it was on entry (the real ops and the test doubles loaded first):
    targets registered inside are removed, targets replaced inside (``replace=True``) come back."""
    before = load_targets(include_doubles=True)
    try:
        yield
    finally:
        for name, target in all_targets().items():
            if name not in before:
                unregister_target(name)
            elif target is not before[name]:
                register_target(before[name], replace=True)


def kernel_bound(res: Any, emulated: torch.Tensor, *, tensor_core: bool = False) -> Bound:
    """How far a float32-accumulating FP8 kernel may sit from the emulation on the same operands
    (``res``: a ``harness.quant.linear.LinearResult``: the exact operands and scales the kernel got).

    Both sum K exact FP8 products in float32 (orders may differ) and apply two scale multiplies:
    each is within gamma_(K+2) * sum|terms| of the exact value (Higham 3.1), so they are within
    twice that of each other; both then round once to the output dtype, which can put them one
    output ULP apart where the float32 values straddle a rounding boundary.  ``tensor_core``: the
    kernel accumulates on tensor cores (14-bit runs of 128 products, float32 across runs), which
    widens the kernel's side of the bound.
    """
    a = res.a.to(torch.float64) * res.scale_a.to(torch.float64)
    b = (res.b.to(torch.float64) * res.scale_b.to(torch.float64))[:, : res.plan.n]
    k = res.a.shape[1]
    per_elem = scaled_mm_kernel_bound(a, b, emulated, res.plan.out_dtype, tensor_core=tensor_core)
    floor = float(per_elem.max()) if per_elem.numel() else 0.0
    how = (
        "a tensor-core accumulator (14 bits per 128-product run, float32 across runs) + the emulation's "
        "float32 sum (gamma_(K+2) x |A||B|)"
        if tensor_core
        else "float32 accumulation in any order (2 x gamma_(K+2) x |A||B|)"
    )
    return Bound(
        k=0.0, floor=floor, why=f"K={k} FP8 products: {how} + 1 ULP of {res.plan.out_dtype} for the final rounding"
    )


def hard_permutation_attention(heads: int, seq: int, head_dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    """bf16 q, k, v of shape (1, heads, seq, head_dim) (HND) whose attention is a permutation of v's rows,
    and that permuted v: an oracle independent of any attention implementation (``seq <= head_dim``).

    Query i and key ``perm[i]`` share the one-hot direction e_i scaled by 64: their score is
    64 * 64 / sqrt(head_dim) >= 360 (head_dim <= 128) above every other score of the row, so softmax
    is exactly one-hot in float32 (exp(-360) underflows) and in every narrower P format.  v's
    entries are +-6: exact in bf16 and FP16, in E4M3 with a per-channel scale (amax 6 -> +-448) and in
    NVFP4 (every block's amax is 6, an E2M1 value).  So any correct attention, quantized or not,
    returns ``v[perm]`` exactly.
    """
    if not 0 < seq <= head_dim <= 128:
        raise ValueError(f"need 0 < seq <= head_dim <= 128, got seq={seq}, head_dim={head_dim}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(seq, generator=g)
    tokens = torch.arange(seq)
    q = torch.zeros(1, heads, seq, head_dim)
    q[:, :, tokens, tokens] = 64.0
    k = torch.zeros(1, heads, seq, head_dim)
    k[:, :, perm, tokens] = 64.0
    v = 6.0 * (torch.randint(0, 2, (1, heads, seq, head_dim), generator=g) * 2 - 1).float()
    return tuple(t.to(torch.bfloat16) for t in (q, k, v, v[:, :, perm]))


def wait_exited(pid: int, timeout: float) -> bool:
    """Block until process ``pid`` (not necessarily our child) has exited, without reaping it; False on timeout."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def harness_argv(*args: str) -> list[str]:
    """``python -m harness ARGS...`` with this interpreter: the CLI as a user runs it."""
    return [sys.executable, "-m", "harness", *args]


def run_at_once(
    *commands: Sequence[str] | tuple[Sequence[str], Mapping[str, Any]], timeout: float, **common: Any
) -> list[subprocess.CompletedProcess]:
    """Start every command at once and wait for all; their results (text output) in the order given.

    A command is an argv, or ``(argv, kw)`` with ``Popen`` keywords of its own over ``common`` (cwd, env).
    Output goes to temporary files, not pipes, so no command blocks on a full pipe while another is awaited.
    A command still running after ``timeout`` s (counted from the start of all) is killed: returncode -9.
    """
    started = []
    for cmd in commands:
        argv, kw = (cmd[0], {**common, **cmd[1]}) if isinstance(cmd, tuple) else (cmd, common)
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        started.append((subprocess.Popen(list(argv), stdout=out, stderr=err, text=True, **kw), out, err))
    deadline = time.monotonic() + timeout
    results = []
    for proc, out, err in started:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read())
            f.close()
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, *texts))
    return results


def empty_corpus(tmp_path: Path) -> Path:
    """An empty regression corpus folder (every failure is new); the matrix needs ``--corpus`` to exist."""
    d = tmp_path / "empty-corpus"
    d.mkdir(exist_ok=True)
    return d


class InProcessPool:
    """Stands in for WorkerPool in fast matrix tests: runs each case in this process when submitted
    (``fail_after``: ``submit`` raises after that many cases, an injected harness bug)."""

    def __init__(self, devices, workers_per_device=1, fail_after=None, **kw):
        self.devices = list(devices)
        self.cases = []
        self.fail_after = fail_after

    def submit(self, case):
        from harness.runner.execute import run_case

        if self.fail_after is not None and len(self.cases) >= self.fail_after:
            raise RuntimeError("injected harness bug in submit")
        self.cases.append(case)
        f: Future = Future()
        f.set_result(run_case(case, self.devices[0]))
        return f

    def close(self, cancel_pending=False):
        pass
