"""Fixtures every test module shares (the root ``conftest.py`` stays the control point: profiles, markers,
GPU skips).

- The test doubles (``cpu.*``, ``fault.*``: :mod:`harness.targets.doubles`) are registered for the
  session, with the real op targets: tests run them in process and submit them to worker pools
  (whose workers register them too).
- After each test, the target registry is put back as it was before the test: a target a test
  registers (``register_target(..., replace=True)`` included) does not leak into the next ones, and a
  target it replaced comes back.
- Shared helpers (``case``, ``kernel_bound``) live in ``tests/helpers.py``: ``from helpers import case``
  (this file's directory is on ``sys.path`` under pytest's default import mode).
- The environment probe (``harness.env.collect_env_subprocess``, a child interpreter that imports torch: ~1 s)
  runs once per session for each environment: every in-process matrix run asks it for the same answer, and
  gets a copy of the first one's (a test that changes ``os.environ`` gets a probe of its own).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Iterator

import pytest

import harness.env
from harness.targets import load_targets
from helpers import restored_registry

load_targets(include_doubles=True)


@pytest.fixture(scope="session", autouse=True)
def probe_env_once() -> Iterator[None]:
    """Memoize the environment probe by (its arguments, ``os.environ``) for the session (see the docstring)."""
    real = harness.env.collect_env_subprocess
    seen: dict[Any, dict[str, Any]] = {}

    def once(timeout: float = 120.0, *, backends: bool = False) -> dict[str, Any]:
        key = (backends, tuple(sorted((k, v) for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST")))
        if key not in seen:
            seen[key] = real(timeout=timeout, backends=backends)
        return copy.deepcopy(seen[key])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness.env, "collect_env_subprocess", once)
        yield


@pytest.fixture(autouse=True)
def restore_target_registry() -> Iterator[None]:
    """Undo the registrations a test made: new names are removed, replaced ones restored."""
    with restored_registry():
        yield
