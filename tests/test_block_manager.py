"""BlockManager on its own: null block, exhaustion, atomic allocation, double free, and a random-operation
property test against a plain set-based reference allocator."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoflow.scheduler import NULL_BLOCK, BlockAllocationError, BlockManager, Request, blocks_for_tokens


def _req(rid: str = "r") -> Request:
    return Request(rid, [1, 2, 3])


def test_null_block_never_handed_out_and_all_blocks_usable() -> None:
    bm = BlockManager(num_blocks=9, block_size=4)
    assert bm.num_usable_blocks == 8 and bm.num_free_blocks == 8 and bm.num_used_blocks == 0
    r = _req()
    assert bm.allocate(r, 8 * 4)  # the whole usable cache: 32 slots = 8 blocks
    assert sorted(r.block_ids) == list(range(1, 9))
    assert NULL_BLOCK not in r.block_ids
    assert bm.num_free_blocks == 0 and bm.usage == 1.0


def test_allocate_grows_only_what_is_missing() -> None:
    bm = BlockManager(10, 4)
    r = _req()
    assert bm.blocks_needed(r, 5) == 2  # ceil(5 / 4)
    assert bm.allocate(r, 5)
    first = list(r.block_ids)
    assert bm.blocks_needed(r, 8) == 0  # 2 blocks already cover 8 slots
    assert bm.allocate(r, 8) and r.block_ids == first
    assert bm.allocate(r, 9)
    assert r.block_ids[:2] == first and len(r.block_ids) == 3  # grows at the end, never reorders
    assert bm.allocate(r, 0) and len(r.block_ids) == 3


def test_exhaustion_is_all_or_nothing() -> None:
    bm = BlockManager(5, 2)  # 4 usable blocks
    a, b = _req("a"), _req("b")
    assert bm.allocate(a, 5)  # 3 blocks
    assert not bm.can_allocate(2)
    assert not bm.allocate(b, 4)  # needs 2, only 1 free
    assert b.block_ids == [] and bm.num_free_blocks == 1
    assert bm.allocate(b, 2)
    assert bm.num_free_blocks == 0 and bm.usage == 1.0


def test_free_returns_every_block_and_is_idempotent() -> None:
    bm = BlockManager(7, 16)
    a, b = _req("a"), _req("b")
    assert bm.allocate(a, 40) and bm.allocate(b, 20)
    assert bm.free(a) == 3
    assert a.block_ids == []
    assert bm.free(a) == 0  # a request with no blocks: nothing to do
    assert bm.free(b) == 2
    assert bm.num_free_blocks == 6 and bm.num_used_blocks == 0 and bm.usage == 0.0


def test_free_rebinds_so_an_inflight_plan_keeps_its_table() -> None:
    bm = BlockManager(7, 4)
    a = _req()
    bm.allocate(a, 8)
    table = a.block_ids
    snapshot = list(table)
    bm.free(a)
    assert table == snapshot  # the plan's view is untouched
    assert a.block_ids is not table


def test_double_free_through_a_shared_table_raises_and_changes_nothing() -> None:
    bm = BlockManager(7, 4)
    a, b = _req("a"), _req("b")
    bm.allocate(a, 8)
    b.block_ids = list(a.block_ids)  # a bug: two requests own the same pages
    bm.free(a)
    free_before = bm.num_free_blocks
    with pytest.raises(BlockAllocationError, match="freed twice"):
        bm.free(b)
    assert bm.num_free_blocks == free_before


@pytest.mark.parametrize("num_blocks, block_size", [(1, 16), (0, 16), (8, 0), (8, True)])
def test_bad_sizes_raise(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError, match="num_blocks|block_size"):
        BlockManager(num_blocks, block_size)


def test_blocks_for_tokens() -> None:
    assert [blocks_for_tokens(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


@settings(max_examples=150, deadline=None)
@given(
    num_blocks=st.integers(2, 40),
    block_size=st.sampled_from([1, 2, 4, 16]),
    ops=st.lists(st.tuples(st.sampled_from(["grow", "free"]), st.integers(0, 5), st.integers(0, 80)), max_size=60),
)
def test_random_operations_match_a_reference_allocator(
    num_blocks: int, block_size: int, ops: list[tuple[str, int, int]]
) -> None:
    bm = BlockManager(num_blocks, block_size)
    reqs = [_req(str(i)) for i in range(6)]
    ref_free = set(range(1, num_blocks))  # reference: the set of free block ids
    ref_len = [0] * 6  # reference: tokens covered per request
    for op, i, n in ops:
        r = reqs[i]
        if op == "grow":
            need = max(0, -(-n // block_size) - len(r.block_ids))
            ok = bm.allocate(r, n)
            assert ok == (need <= len(ref_free))
            if ok:
                new = r.block_ids[len(r.block_ids) - need :]
                assert set(new) <= ref_free  # only free blocks are handed out
                ref_free -= set(new)
                ref_len[i] = max(ref_len[i], n)
        else:
            ref_free |= set(r.block_ids)
            bm.free(r)
            ref_len[i] = 0
        owned = [b for q in reqs for b in q.block_ids]
        assert len(owned) == len(set(owned))  # no block owned twice
        assert set(owned).isdisjoint(ref_free) and NULL_BLOCK not in owned
        assert len(owned) + len(ref_free) == num_blocks - 1
        assert bm.num_free_blocks == len(ref_free)
        for q, tokens in zip(reqs, ref_len):
            assert len(q.block_ids) * block_size >= tokens
    for q in reqs:
        bm.free(q)
    assert bm.num_free_blocks == num_blocks - 1
