"""Topology: ranks <-> coordinates and group member lists, with hand-computed expectations."""

from __future__ import annotations

import pytest

from raymoe.parallel.topology import Coord, Topology


def test_stage_major_ranks_and_coordinates():
    t = Topology(pp=2, ep=2, dp=4)
    assert t.world_size == 8 and t.edp == 2
    assert t.rank(pp_rank=1, dp_rank=2) == 6
    assert t.coord(6) == Coord(pp_rank=1, dp_rank=2, ep_rank=0, edp_rank=1)
    assert t.coord(3) == Coord(pp_rank=0, dp_rank=3, ep_rank=1, edp_rank=1)
    assert [t.coord(r).pp_rank for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(t.rank(pp_rank=t.coord(r).pp_rank, dp_rank=t.coord(r).dp_rank) == r for r in range(8))


def test_group_member_lists():
    t = Topology(pp=2, ep=2, dp=4)
    assert t.pp_groups() == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert t.dp_groups() == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert t.ep_groups() == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert t.edp_groups() == [(0, 2), (1, 3), (4, 6), (5, 7)]
    # every rank is in exactly one group of each kind
    for kind in ("pp", "dp", "ep", "edp"):
        members = sorted(r for g in getattr(t, f"{kind}_groups")() for r in g)
        assert members == list(range(8)), kind


def test_embedding_and_mirror_groups():
    t = Topology(pp=4, dp=2)
    assert t.embedding_groups() == [(0, 6), (1, 7)]
    assert t.mirror_groups() == [(0, 6), (2, 4), (1, 7), (3, 5)]
    assert Topology(pp=1, dp=2).embedding_groups() == []
    assert t.group_of(t.mirror_groups(), 4) == (2, 4)
    assert t.pipeline_peer(5, 0) == 1


def test_actor_names_read_like_the_topology():
    t = Topology(pp=2, ep=2, dp=2)
    assert [t.actor_name(r) for r in range(4)] == [
        "raymoe/pp0-ep0-dp0", "raymoe/pp0-ep1-dp1", "raymoe/pp1-ep0-dp0", "raymoe/pp1-ep1-dp1",
    ]


def test_invalid_topologies_name_the_values():
    with pytest.raises(ValueError, match=r"dp \(3\) must be divisible by ep \(2\)"):
        Topology(pp=1, ep=2, dp=3)
    with pytest.raises(ValueError, match="pp must be >= 1, got 0"):
        Topology(pp=0)
    with pytest.raises(ValueError, match="rank 8 outside world of size 8"):
        Topology(pp=2, dp=4).coord(8)
