"""PackedBatches: window layout, determinism, dp sharding == global batch, exact resume from a cursor."""

import json

import numpy as np
import pytest
import torch

from raymoe.data import Cursor, PackedBatches

# A synthetic stream whose token at position i is i % 251: a window's first token names where it starts.
STREAM = (np.arange(10_007) % 251).astype(np.uint16)


def _loader(**kwargs) -> PackedBatches:
    args = dict(seq_len=32, global_batch_size=8, extra_tokens=2, seed=3)
    return PackedBatches(STREAM, **(args | kwargs))


def _take(loader: PackedBatches, steps: int) -> list[torch.Tensor]:
    return [loader.next_batch() for _ in range(steps)]


def test_windows_are_consecutive_tokens_starting_at_multiples_of_seq_len():
    loader = _loader()
    assert loader.num_windows == (len(STREAM) - 2) // 32
    batch = loader.next_batch()
    assert batch.shape == (8, 34) and batch.dtype == torch.int64
    stream = torch.from_numpy(STREAM.astype(np.int64))
    starts = range(0, loader.num_windows * 32, 32)
    for window in batch:
        assert torch.all((window[1:] - window[:-1]) % 251 == 1)  # consecutive stream tokens
        assert any(torch.equal(stream[s : s + 34], window) for s in starts)


def test_each_epoch_is_a_permutation_of_all_windows():
    loader = _loader(global_batch_size=1)
    firsts = [[int(loader.next_batch()[0, 0]) for _ in range(loader.num_windows)] for _ in range(2)]
    epoch0, epoch1 = (np.array(f) for f in firsts)
    all_windows = np.arange(loader.num_windows) * 32 % 251
    assert sorted(epoch0) == sorted(all_windows) == sorted(epoch1)
    assert not np.array_equal(epoch0, epoch1)  # a fresh order each epoch
    assert loader.cursor == Cursor(epoch=2, position=0, seed=3)


def test_deterministic_and_seed_dependent():
    a, b, c = _take(_loader(), 5), _take(_loader(), 5), _take(_loader(seed=4, cursor=Cursor(seed=4)), 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, z) for x, z in zip(a, c))


@pytest.mark.parametrize("dp_size", [2, 4, 8])
def test_dp_ranks_concatenate_to_the_global_batch(dp_size):
    # 60 steps of 8 cross several epoch boundaries (312 windows per epoch).
    reference = _take(_loader(), 60)
    ranks = [_take(_loader(dp_rank=r, dp_size=dp_size), 60) for r in range(dp_size)]
    for step, global_batch in enumerate(reference):
        local = [ranks[r][step] for r in range(dp_size)]
        assert all(x.shape == (8 // dp_size, 34) for x in local)
        assert torch.equal(torch.cat(local), global_batch)


def test_global_batch_larger_than_an_epoch():
    tiny = STREAM[:100]  # 3 windows of 32 + 2
    loader = PackedBatches(tiny, seq_len=32, global_batch_size=8, seed=0)
    batch = loader.next_batch()
    assert batch.shape == (8, 33)
    assert loader.cursor == Cursor(epoch=2, position=2, seed=0)
    starts = sorted(int(w[0]) for w in batch[:6])
    assert starts == [0, 0, 32, 32, 64, 64]  # two whole epochs, then two windows of the third


def test_resume_from_cursor_reproduces_the_following_batches():
    loader = _loader()
    _take(loader, 45)  # into the second epoch
    saved = json.loads(json.dumps(loader.cursor.to_dict()))
    expected = _take(loader, 50)
    resumed = _loader(cursor=Cursor.from_dict(saved))
    assert all(torch.equal(x, y) for x, y in zip(expected, _take(resumed, 50)))
    # A different dp layout resumes the same global stream.
    halves = [_take(_loader(dp_rank=r, dp_size=2, cursor=Cursor.from_dict(saved)), 50) for r in range(2)]
    assert all(torch.equal(torch.cat([halves[0][s], halves[1][s]]), expected[s]) for s in range(50))


def test_iteration_protocol():
    loader = _loader()
    batches = [b for _, b in zip(range(3), loader)]
    assert all(torch.equal(x, y) for x, y in zip(batches, _take(_loader(), 3)))
    assert loader.cursor.position == 24


def test_invalid_arguments_name_the_values():
    with pytest.raises(ValueError, match="global_batch_size=6 is not divisible by dp_size=4"):
        _loader(global_batch_size=6, dp_size=4)
    with pytest.raises(ValueError, match="dp_rank=2 is out of range for dp_size=2"):
        _loader(dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match=r"has 20 tokens, fewer than one window .* = 32 \+ 2 = 34"):
        PackedBatches(STREAM[:20], seq_len=32, global_batch_size=1, extra_tokens=2)
    with pytest.raises(ValueError, match="extra_tokens=0"):
        _loader(extra_tokens=0)
    with pytest.raises(ValueError, match="cursor was saved with seed=9 but the loader has seed=3"):
        _loader(cursor=Cursor(seed=9))
    with pytest.raises(ValueError, match="cursor position 5000 is past the 312 windows"):
        _loader(cursor=Cursor(position=5000, seed=3))
    with pytest.raises(ValueError, match="not a data cursor"):
        Cursor.from_dict({"epoch": 1})
    with pytest.raises(ValueError, match="must be >= 0"):
        Cursor(epoch=-1)
