"""harness.shard: shards are disjoint, complete, order-free and the same in every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.shard import Shard, ShardError, cell_key, parse_shard, shard_of, split

keys = st.lists(st.text(min_size=1, max_size=30), max_size=60, unique=True)


@given(keys, st.integers(1, 40))
def test_shards_are_disjoint_and_complete(items: list[str], n: int) -> None:
    taken = [Shard(i, n).select(items, key=str) for i in range(1, n + 1)]
    flat = [k for share in taken for k in share]
    assert sorted(flat) == sorted(items)  # every item once: complete and disjoint
    assert len(flat) == len(set(flat))


@given(keys, st.integers(1, 40), st.randoms())
def test_an_items_shard_does_not_depend_on_list_order_or_other_items(items: list[str], n: int, rnd) -> None:
    shuffled = list(items)
    rnd.shuffle(shuffled)
    some = shuffled[: len(shuffled) // 2]
    for i in range(1, n + 1):
        assert set(Shard(i, n).select(items, key=str)) & set(some) == set(Shard(i, n).select(some, key=str))
        assert Shard(i, n).select(shuffled, key=str) == [k for k in shuffled if k in Shard(i, n).select(items, str)]


def test_split_matches_select_and_lists_empty_shards() -> None:
    ks = [cell_key("fp8_linear", c) for c in ("contiguous", "transposed", "offset_1")]
    parts = split(ks, 50)
    assert sorted(parts) == list(range(1, 51))
    for i, share in parts.items():
        assert share == Shard(i, 50).select(ks, key=str)
    assert sum(1 for share in parts.values() if not share) >= 47


@pytest.mark.parametrize("seed", ["0", "1", "4242"])
def test_the_split_is_the_same_in_another_process_with_another_hash_seed(seed: str) -> None:
    ks = [cell_key(op, c) for op in ("fp8_linear", "attn.sdpa", "legacy.comfyui") for c in ("contiguous", "t", "o_3")]
    here = [shard_of(k, 7) for k in ks]
    code = (
        "import json, sys; from harness.shard import shard_of; "
        "print(json.dumps([shard_of(k, 7) for k in json.loads(sys.argv[1])]))"
    )
    env = dict(os.environ, PYTHONHASHSEED=seed)
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(ks)], capture_output=True, text=True, env=env, timeout=60, check=True
    )
    assert json.loads(out.stdout) == here
    assert len(set(here)) > 1  # the keys do spread over shards


def test_cell_key_is_unambiguous() -> None:
    assert cell_key("a-b", "c") != cell_key("a", "b-c")
    assert cell_key('a"', "b") != cell_key("a", '"b')


@pytest.mark.parametrize("text, want", [("1/1", (1, 1)), ("2/4", (2, 4)), (" 4 / 4 ", (4, 4))])
def test_parse_shard(text: str, want: tuple[int, int]) -> None:
    s = parse_shard(text)
    assert (s.index, s.count) == want and str(s) == f"{want[0]}/{want[1]}"


@pytest.mark.parametrize(
    "text, match",
    [
        ("0/4", "between 1 and 4"),
        ("5/4", "between 1 and 4"),
        ("1/0", ">= 1"),
        ("2", "is not I/N"),
        ("a/b", "is not I/N"),
        ("-1/4", "is not I/N"),
    ],
)
def test_parse_shard_rejects_with_the_fix(text: str, match: str) -> None:
    with pytest.raises(ShardError, match=match):
        parse_shard(text)
