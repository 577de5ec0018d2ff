"""The single control point for the test suite: profiles, options, markers, capability skips.

- Hypothesis profile: ``--harness-profile`` or ``HARNESS_PROFILE`` (dev | ci | nightly); ``ci`` under ``CI``.
- ``gpu``-marked tests skip, with the missing capability named, when no CUDA device is visible.
  The probe runs when tests are collected (never at import of the package) and asks
  ``torch.cuda.is_available()``, which does not create a CUDA context; only a CUDA torch that finds no GPU asks
  more (CUDA's error and ``nvidia-smi``: :func:`harness.capability.no_cuda_reason`), to say why.
- The runner's pytest plugin (pool fixture, case files for failures) is enabled here, and
  :mod:`harness.pytest_fleet` (``--harness-shard I/N``; one GPU per pytest-xdist worker).
"""

from __future__ import annotations

import pytest
import torch

from harness.capability import no_cuda_reason
from harness.profiles import PROFILES, load_profile

pytest_plugins = ["harness.pytest_plugin", "harness.pytest_fleet"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness")
    group.addoption(
        "--harness-profile",
        choices=PROFILES,
        default=None,
        help="Hypothesis profile (default: $HARNESS_PROFILE, else 'ci' under CI, else 'dev')",
    )


def pytest_configure(config: pytest.Config) -> None:
    try:
        name = load_profile(config.getoption("--harness-profile"))
    except ValueError as e:  # a bad HARNESS_PROFILE / HARNESS_HYPOTHESIS_DB: one line, not a traceback
        raise pytest.UsageError(str(e)) from None
    config._harness_profile = name  # type: ignore[attr-defined]


def pytest_report_header(config: pytest.Config) -> list[str]:
    cuda = torch.cuda.is_available()
    return [
        f"harness: hypothesis profile {getattr(config, '_harness_profile', '?')}; torch {torch.__version__}; "
        f"CUDA {'available' if cuda else 'not available'}"
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    probed = False
    for item in items:
        if item.get_closest_marker("gpu") is None:
            continue
        if not probed:
            reason, probed = no_cuda_reason(), True
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
