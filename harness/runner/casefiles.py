"""Case files of failing results: the stored values, a unique path per result, and the replay command."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from harness.verdicts import Result

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from harness.cases import Case

__all__ = ["MAX_SAVED_BYTES", "case_values", "replay_command", "save_failure"]

#: stored input values larger than this are not written beside a failing case (recipes suffice)
MAX_SAVED_BYTES = 64 * 2**20


def case_values(case: "Case") -> dict[str, "torch.Tensor"]:
    """The input values a worker generates for ``case`` (CPU, contiguous, logical shapes)."""
    return {name: case.value_spec(name).generate(spec.shape, spec.torch_dtype) for name, spec in case.layouts.items()}


def _case_digest(case: "Case") -> str:
    d = case.to_dict()
    d.pop("env", None)
    d.pop("verdict", None)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def replay_command(path: str | os.PathLike, device: str | None = None) -> str:
    """One line that reruns a case file: ``python -m harness replay PATH [--device D]``."""
    p = str(path)
    q = p if all(c.isalnum() or c in "/._-+:=" for c in p) else "'" + p.replace("'", "'\\''") + "'"
    return f"python -m harness replay {q}" + (f" --device {device}" if device and device != "cpu" else "")


def _saved_tensors(case: "Case", values: Mapping[str, "torch.Tensor"] | None) -> dict[str, "torch.Tensor"]:
    """The input values stored beside a failing case: ``values`` or the recipes', none beyond ``MAX_SAVED_BYTES``
    (checked on the layouts, before anything is generated)."""
    if sum(math.prod(s.shape) * s.itemsize for s in case.layouts.values()) > MAX_SAVED_BYTES:
        return {}
    return dict(values) if values else case_values(case)


_RESERVED: set[Path] = set()
_RESERVED_LOCK = threading.Lock()


def _unique_case_path(cases_dir: Path, stem: str) -> Path:
    """``cases_dir/stem.json``, or ``stem-2.json``, ``stem-3.json``...: the first that no file and no earlier
    result of this process holds (two results never write the same case)."""
    with _RESERVED_LOCK:
        for n in itertools.count(1):
            path = cases_dir / (f"{stem}.json" if n == 1 else f"{stem}-{n}.json")
            key = path.absolute()
            if key not in _RESERVED and not path.exists() and not path.with_suffix(".safetensors").exists():
                _RESERVED.add(key)
                return path
    raise AssertionError("unreachable")  # pragma: no cover


def save_failure(
    case: "Case",
    result: Result,
    cases_dir: str | os.PathLike,
    *,
    values: Mapping[str, "torch.Tensor"] | None = None,
    name: str | None = None,
) -> Path:
    """Write ``case`` with its verdict and environment to ``cases_dir`` (JSON + safetensors).

    ``name``: file stem (default ``{op}-{verdict}-{digest}``, with ``-2``, ``-3``... when a file or an
    earlier result of this process has it, so every result gets its own file; a given ``name`` is
    overwritten, which is how the pytest plugin keeps Hypothesis' final, shrunk example). Stored values are the
    given ``values`` or the ones the recipes generate, unless they exceed ``MAX_SAVED_BYTES``.
    Sets ``result.case_path`` and ``result.replay``; returns the JSON path.
    """
    from harness.cases import save_case

    stem = name or f"{case.op}-{result.verdict.value}-{_case_digest(case)}"
    # no dots: Path.with_suffix (used for the .safetensors sibling) would cut the name at one
    stem = "".join(c if c.isalnum() or c in "-" else "_" for c in stem)[:180]
    path = Path(cases_dir) / f"{stem}.json" if name else _unique_case_path(Path(cases_dir), stem)
    tensors = _saved_tensors(case, values)
    verdict = {
        k: v
        for k, v in result.to_json().items()
        if k in ("verdict", "message", "metrics", "bound", "attribution", "layouts") and v
    }
    env = dict(case.env)
    env.update({k: v for k, v in result.env.items() if k not in env})
    saved = dataclasses.replace(case, verdict=verdict, env=env)
    json_path = save_case(saved, path, tensors=tensors or None)
    result.case_path = str(json_path)
    result.replay = replay_command(json_path, result.device if result.device.startswith("cuda") else None)
    return json_path
