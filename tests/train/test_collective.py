"""The distributed seam in one process (jackpot.train.distributed): row ownership (`Shard`), padding and
loss scaling are the identity where they must be, and map rows as documented. Several processes against
one: tests/train/test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from jackpot.train.distributed import Collective, Shard


def test_a_rank_holds_its_contiguous_block_of_the_global_rows():
    shards = [Collective(rank, 3).shard(12) for rank in range(3)]
    assert [s.rows for s in shards] == [range(0, 4), range(4, 8), range(8, 12)]
    assert all(s.total == 12 for s in shards)
    with pytest.raises(ValueError, match=r"\(10\) must be divisible by the number of processes \(3\)"):
        Collective(0, 3).shard(10)
    assert Collective().shard(5) == Shard(range(0, 5), 5)


def test_local_rows_of_a_mini_batch_keep_the_permutation_order():
    shard = Shard(range(4, 8), 12)
    assert shard.local(torch.tensor([9, 5, 0, 7, 4, 11])).tolist() == [1, 3, 0]
    assert shard.local(torch.tensor([0, 1, 11])).numel() == 0  # a rank may hold none of a mini-batch
    whole = Shard(range(0, 6), 6)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(whole.local(order), order)  # one process: the global rows are its own


def test_one_process_pads_nothing_and_scales_by_one():
    coll = Collective()
    assert coll.padded([1, 2], "pad") == [1, 2]
    t = torch.randn(3, 4)
    gathered, first = coll.gather_rows(t)
    assert gathered is t and first == 0 and coll.sum(t) is t and coll.max_int(7) == 7


@pytest.mark.parametrize("world", [1, 3])
def test_backward_scales_a_rank_share_by_the_world_size(world):
    """DDP and FSDP2 average gradients over ranks: a rank's share of the global loss is scaled by the world
    size so that the average is the global loss's gradient."""
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    Collective(0, world).backward((x ** 2).sum())
    assert torch.equal(x.grad, world * 2 * x.detach())
