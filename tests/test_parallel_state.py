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


def test_a_process_started_by_a_one_process_run_makes_its_own_group(tmp_path):
    """A one-process run sets RANK/WORLD_SIZE/MASTER_PORT in its environment; a command it starts (a test calling
    `mtnlg train`, a Python API user's subprocess) inherits them. The child used to take them for a launcher's and
    rendezvous on the parent's port, which the parent's group still holds: "server socket has failed to listen"
    (CI failed so on every one-process `mtnlg train` in tests/test_launchers.py after an in-process test on the
    same worker). Here the child gets a port of its own, and a launcher's variables are still obeyed."""
    import os
    import subprocess
    import sys
    import textwrap

    child = "from mtnlg.parallel.distributed import init_distributed; init_distributed(); print('child ok')"
    parent = textwrap.dedent(f"""
        import os, subprocess, sys
        from mtnlg.parallel.distributed import init_distributed
        init_distributed()
        assert os.environ["RANK"] == "0" and "MTNLG_ONE_PROCESS_RUN" in os.environ
        out = subprocess.run([sys.executable, "-c", {child!r}], capture_output=True, text=True, timeout=300)
        print(out.stdout[-300:], out.stderr[-300:])
        sys.exit(out.returncode)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-c", parent], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**env, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])})
    assert proc.returncode == 0 and "child ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_a_launchers_rank_variables_are_obeyed(monkeypatch):
    from mtnlg.parallel.distributed import ONE_PROCESS_MARK, under_launcher

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv(ONE_PROCESS_MARK, raising=False)
    assert under_launcher()
    monkeypatch.setenv(ONE_PROCESS_MARK, "1:23456")  # a one-process grandparent's mark, a launcher's port
    assert under_launcher()
    monkeypatch.setenv("MASTER_PORT", "23456")  # the grandparent's own variables, inherited
    assert not under_launcher()
