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
"""

from __future__ import annotations

from typing import Iterator

import pytest

from harness.targets import load_targets
from helpers import restored_registry

load_targets(include_doubles=True)


@pytest.fixture(autouse=True)
def restore_target_registry() -> Iterator[None]:
    """Undo the registrations a test made: new names are removed, replaced ones restored."""
    with restored_registry():
        yield
