"""Hypothesis profiles, registered in one place.

- ``dev`` (default on a workstation): 200 examples, no deadline, local example database.
- ``ci`` (default when ``CI`` is set): derandomized (same examples every run), 200 examples, no database.
- ``nightly``: 2000 examples; the example database lives in ``HARNESS_HYPOTHESIS_DB`` (a directory runners
  share, so one runner's failure is replayed first by every other) or ``.hypothesis/nightly``.

Select with ``HARNESS_PROFILE=<name>`` or ``pytest --harness-profile=<name>``.
Individual tests may lower ``max_examples`` for expensive bodies (GPU kernels), never raise the floor.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

__all__ = ["PROFILES", "register_profiles", "load_profile", "default_profile"]

PROFILES = ("dev", "ci", "nightly")
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large]


def register_profiles() -> None:
    """Register the three profiles with Hypothesis (idempotent)."""
    settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=_SUPPRESS)
    settings.register_profile(
        "ci",
        max_examples=200,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=_SUPPRESS,
    )
    db_dir = os.environ.get("HARNESS_HYPOTHESIS_DB", os.path.join(".hypothesis", "nightly"))
    settings.register_profile(
        "nightly",
        max_examples=2000,
        deadline=None,
        database=DirectoryBasedExampleDatabase(db_dir),
        print_blob=True,
        suppress_health_check=_SUPPRESS,
    )


def default_profile() -> str:
    """``HARNESS_PROFILE`` if set, else ``ci`` under CI, else ``dev``."""
    return os.environ.get("HARNESS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")


def load_profile(name: str | None = None) -> str:
    """Register the profiles and load ``name`` (default :func:`default_profile`); returns the name loaded."""
    register_profiles()
    name = name or default_profile()
    if name not in PROFILES:
        raise ValueError(f"Hypothesis profile {name!r} unknown; use one of {PROFILES} (HARNESS_PROFILE / --harness-profile)")
    settings.load_profile(name)
    return name
