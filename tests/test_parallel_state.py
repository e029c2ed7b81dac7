"""Rank arithmetic is a pure function of (tp, pp, dp): tested without processes."""

from __future__ import annotations

import pytest

from mtnlg.parallel import ParallelDims


def test_tp_varies_fastest_then_dp_then_pp():
    dims = ParallelDims(tp=2, pp=2, dp=2)
    assert dims.world_size == 8
    assert [dims.coords(r) for r in range(4)] == [
        {"tp": 0, "pp": 0, "dp": 0}, {"tp": 1, "pp": 0, "dp": 0},
        {"tp": 0, "pp": 0, "dp": 1}, {"tp": 1, "pp": 0, "dp": 1},
    ]
    assert dims.coords(7) == {"tp": 1, "pp": 1, "dp": 1}
    assert dims.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.groups("mp") == [[0, 1, 4, 5], [2, 3, 6, 7]]


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2), (4, 2, 1), (2, 1, 4)])
def test_groups_partition_the_world(tp, pp, dp):
    dims = ParallelDims(tp, pp, dp)
    for axis, size in [("tp", tp), ("pp", pp), ("dp", dp), ("mp", tp * pp)]:
        groups = dims.groups(axis)
        assert sorted(r for g in groups for r in g) == list(range(dims.world_size))
        assert all(len(g) == size for g in groups)
    for r in range(dims.world_size):
        c = dims.coords(r)
        assert dims.rank_of(c["tp"], c["pp"], c["dp"]) == r


def test_a_one_process_run_listens_on_a_port_outside_the_ephemeral_range():
    """A kernel-chosen free port is ephemeral: an outgoing connection elsewhere took it before the rendezvous
    listened ("server socket has failed to listen", seen twice in the parallel suite). The one-process port is
    drawn below 32768, and is free."""
    import socket

    from mtnlg.parallel.distributed import _free_port

    for _ in range(20):
        port = _free_port()
        assert 20000 <= port < 32768
        with socket.socket() as s:
            s.bind(("", port))
