"""Deterministic shards: which 1/N share of a run (matrix cells, pytest items) this machine takes.

A shard is written ``I/N`` with ``1 <= I <= N``.  An item belongs to shard
``1 + (h mod N)`` where ``h`` is the first 8 bytes of the SHA-256 of its key
(for a matrix cell ``op`` and ``layout class``; for a pytest item its node id).
The hash is not Python's ``hash()`` (salted per process by ``PYTHONHASHSEED``)
and does not depend on list order, so every machine computes the same split;
the N shards are disjoint and together hold every item.  An item keeps its
shard when other items are added or removed; with few items per shard the
shares are uneven (some may be empty).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Shard", "ShardError", "cell_key", "parse_shard", "shard_of", "shard_record", "split"]

T = TypeVar("T")
_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


class ShardError(ValueError):
    """A shard spec is malformed; the message says what a valid one looks like."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based: ``Shard(1, 4)`` .. ``Shard(4, 4)``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not (isinstance(self.count, int) and self.count >= 1):
            raise ShardError(f"shard count {self.count!r} must be an integer >= 1 (e.g. 2/4)")
        if not (isinstance(self.index, int) and 1 <= self.index <= self.count):
            raise ShardError(f"shard index {self.index!r} must be between 1 and {self.count} (e.g. 2/{self.count})")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, key: str) -> bool:
        """Is the item with this key in this shard?"""
        return shard_of(key, self.count) == self.index

    def select(self, items: Iterable[T], key: Callable[[T], str]) -> list[T]:
        """The items of this shard, in their given order."""
        return [it for it in items if self.holds(key(it))]


def parse_shard(text: str) -> Shard:
    """``"2/4"`` -> ``Shard(2, 4)``; anything else raises :class:`ShardError`."""
    m = _SPEC.fullmatch(str(text))
    if not m:
        raise ShardError(f"shard {text!r} is not I/N; write e.g. --shard 2/4 (shard 2 of 4, 1 <= I <= N)")
    return Shard(int(m.group(1)), int(m.group(2)))


def shard_of(key: str, count: int) -> int:
    """The 1-based shard of ``key`` among ``count`` shards (stable across processes and machines)."""
    if count < 1:
        raise ShardError(f"shard count {count!r} must be >= 1")
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return 1 + int.from_bytes(digest[:8], "big") % count


def cell_key(op: str, layout_class: str) -> str:
    """The shard key of a matrix cell (unambiguous for any op / class names)."""
    return json.dumps([op, layout_class])


def split(keys: Sequence[str], count: int) -> dict[int, list[str]]:
    """Every shard's keys: ``{1: [...], ..., count: [...]}`` (empty shards included)."""
    out: dict[int, list[str]] = {i: [] for i in range(1, count + 1)}
    for k in keys:
        out[shard_of(k, count)].append(k)
    return out


def shard_record(spec: str | Shard, cells: Sequence[T]) -> tuple[list[T], dict[str, Any]]:
    """This shard's matrix cells (objects with ``op`` and ``layout_class``) and the summary's ``shard`` record.

    The record names the shard, the harness version and every cell of the unsharded run in its
    order (``all_cells``), so a merge can check the shards belong together and cover the run.
    """
    from harness import __version__

    shard = spec if isinstance(spec, Shard) else parse_shard(spec)
    mine = shard.select(cells, key=lambda c: cell_key(c.op, c.layout_class))  # type: ignore[attr-defined]
    record = {
        "index": shard.index,
        "count": shard.count,
        "harness": __version__,
        "cells": len(mine),
        "all_cells": [[c.op, c.layout_class] for c in cells],
    }  # type: ignore[attr-defined]
    return mine, record
