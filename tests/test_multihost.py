"""Multi-node for real: two simulated hosts (tests/hosts.py: each its own network stack on a private bridge, hostname,
PID namespace, /dev/shm, sshd, and its own disk at one path) run mtnlg under the deepspeed launcher (pdsh over ssh),
torchrun (one per host, c10d rendezvous) and examples/launch_multinode.sh, with tp=2 inside a host and pp=2 across
the two. Every run is compared with the same run on one host (fp32, the same seed and data).

The cluster needs root, ``ip netns`` and Debian's openssh-server and pdsh (``scripts/setup_system.sh`` installs them;
``scripts/test.sh`` runs it); without them these tests skip and say why."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtnlg.checkpoint.tags import complete_tags, latest_tag
from mtnlg.parallel.hosts import RankHost, choose_interface, lost_contact_message, tp_across_hosts
from tests.dist_helper import skip_unless_required
from tests.hosts import SimHosts, ensure_packages, why_unavailable

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ITERS, HALF, TIMEOUT_S = 6, 3, 20
CONFIG = f"""
model: {{architecture: llama, num_layers: 2, hidden_size: 32, num_attention_heads: 4, num_kv_heads: 2,
        vocab_size: 64, seq_length: 16}}
parallel: {{tensor: 2, pipeline: 2}}
train: {{iters: {ITERS}, micro_batch_size: 2, global_batch_size: 4, log_interval: 1, peak_tflops: 1.0,
        collective_timeout_s: {TIMEOUT_S}}}
data: {{synthetic: {{branching: 2}}}}
deepspeed_config: {ROOT / "ds_configs" / "zero1.json"}
"""
_ports = itertools.count(29600)  # every host has a fresh network stack: any port is free there


class Cluster:
    """The simulated hosts plus what every launch needs: a run config, hostfiles and the launcher environment."""

    def __init__(self, hosts: SimHosts, work: Path):
        self.hosts, self.work = hosts, work
        self.config = work / "run.yaml"
        self.config.write_text(CONFIG)
        self.hostfile = self._hostfile("hostfile", 2)
        self.env_file = work / "deepspeed_env"  # what DeepSpeed's runner exports to every rank (DS_ENV_FILE)
        keep = {k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR",) if k in os.environ}
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in {"OMP_NUM_THREADS": "1", **keep}.items()))

    def _hostfile(self, name: str, slots: int) -> Path:
        path = self.work / name
        path.write_text("".join(f"{h} slots={slots}\n" for h in self.hosts.names))
        return path

    @property
    def master(self) -> str:
        return self.hosts.addr("host1")

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.endswith("_SOCKET_IFNAME")}
        return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DS_ENV_FILE": str(self.env_file),
                **self.hosts.ssh_env(), **extra}

    def start(self, host: str, cmd: list[str], **extra: str) -> subprocess.Popen:
        return self.hosts.popen(host, cmd, env=self.env(**extra), cwd=self.work, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def run(self, host: str, cmd: list[str], timeout: float = 400, **extra: str) -> tuple[int, str]:
        return finish(self.start(host, cmd, **extra), timeout)

    def deepspeed(self, *args: str, hostfile: Path | None = None) -> list[str]:
        """`deepspeed --hostfile` as users run it on the first node: pdsh ssh-es into both hosts."""
        return [str(BIN / "deepspeed"), "--hostfile", str(hostfile or self.hostfile), "--master_addr", self.master,
                "--master_port", str(next(_ports)), *self.script(*args)]

    def script(self, *args: str) -> list[str]:
        return [str(ROOT / "scripts" / "pretrain_gpt.py"), "--config", str(self.config), *args]


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"no exit within {timeout}s:\n{out[-4000:]}") from None
    return proc.returncode, out


def metrics(save: Path) -> dict[int, tuple[float, float]]:
    """iteration -> (loss, grad_norm) from a run's metrics.jsonl (a resumed run appends; the last record wins)."""
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: (r["loss"], r["grad_norm"]) for r in records}


def max_rel_diff(got: dict, ref: dict, iterations) -> tuple[float, float]:
    """(losses, grad norms): the largest relative difference over ``iterations``."""
    assert set(iterations) <= set(got), f"iterations {sorted(got)} lack some of {list(iterations)}"
    return tuple(max(abs(got[i][k] - ref[i][k]) / abs(ref[i][k]) for i in iterations) for k in (0, 1))


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "mtnlg train: error:" in line]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = why_unavailable() or ensure_packages()
    if why:
        skip_unless_required(f"no simulated hosts: {why}")
    work = tmp_path_factory.mktemp("multihost")
    hosts = SimHosts(2, work / "sim", private=[str(work / "local")])
    hosts.up()
    try:
        yield Cluster(hosts, work)
    finally:
        hosts.down()


@pytest.fixture(scope="module")
def one_host(cluster) -> dict[int, tuple[float, float]]:
    """The reference: the same run, all 4 ranks on host1."""
    save = cluster.work / "one_host"
    rc, out = cluster.run("host1", [str(BIN / "torchrun"), "--nproc_per_node", "4", "--master_port",
                                    str(next(_ports)), *cluster.script("--set", f"checkpoint.save={save}")])
    assert rc == 0, out[-4000:]
    assert "hosts:" not in out  # one host
    return metrics(save)


def test_deepspeed_pdsh_then_torchrun_across_hosts_equal_one_host(cluster, one_host):
    """`deepspeed --hostfile` (pdsh over ssh to both hosts) trains iterations 1-3 and saves onto the shared disk;
    torchrun, one per host, resumes and trains 4-6. Losses and gradient norms equal the one-host run's."""
    save = cluster.work / "shared" / "ckpt"
    rc, out = cluster.run("host1", cluster.deepspeed("--set", f"checkpoint.save={save}",
                                                     "--set", f"train.exit_interval={HALF}"))
    assert rc == 0, out[-4000:]
    # both hosts ran ranks, gloo went over the hosts' network (not loopback, although host1 resolves to 127.0.1.1)
    assert "hosts: host1 (ranks 0-1), host2 (ranks 2-3); gloo over eth0 (198.18.0.11, chosen by mtnlg" in out, out
    assert "tensor parallelism spans hosts" not in out
    assert (save / f"global_step{HALF}" / "complete").is_file()

    port = str(next(_ports))
    torchrun = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{cluster.master}:{port}", "--rdzv-id", "mtnlg-test"]
    args = cluster.script("--set", f"checkpoint.save={save}", "--set", f"checkpoint.load={save}")
    t0 = time.time()
    procs = [cluster.start(h, [*torchrun, *args]) for h in ("host1", "host2")]
    results = [finish(p, 400) for p in procs]
    print(f"\ntorchrun on both hosts took {time.time() - t0:.0f}s")
    for rc, text in results:
        assert rc == 0, text[-4000:]
    first = results[0][1]
    assert f"resumed from iteration {HALF}" in first and "hosts: host1 (ranks 0-1), host2 (ranks 2-3)" in first

    losses, norms = max_rel_diff(metrics(save), one_host, range(1, ITERS + 1))
    print(f"\n2 hosts (deepspeed pdsh 1-{HALF}, torchrun {HALF + 1}-{ITERS}) vs 1 host: "
          f"max rel diff loss {losses:.2e}, grad norm {norms:.2e}")
    assert losses <= 1e-6 and norms <= 1e-6


def test_launch_script_node_local_disks_refusal_and_reshard(cluster, one_host):
    """examples/launch_multinode.sh with the checkpoint directory on each host's own disk: the run trains (and
    GLOO_SOCKET_IFNAME reaches the ranks through the environment file); resuming from those disks is refused at start
    with one line naming both hosts, never a silent start from 0; the two disks' files gathered into one directory
    reshard, and the universal checkpoint resumes across the hosts at tp=2 x pp=1 (tensor parallelism spanning the
    hosts: warned) on the one-host loss curve."""
    local = cluster.work / "local" / "ckpt"  # host1 and host2 each see their own directory here
    env = {"MASTER_ADDR": cluster.master, "MASTER_PORT": str(next(_ports)), "GLOO_SOCKET_IFNAME": "eth0",
           "DS_ENV_FILE": str(cluster.work / "launch_env"), "MTNLG_VENV": str(BIN.parent)}
    cmd = ["bash", str(ROOT / "examples" / "launch_multinode.sh"), str(cluster.hostfile), str(cluster.config),
           "--set", f"checkpoint.save={local}", "--set", f"train.exit_interval={HALF}"]
    rc, out = cluster.run("host1", cmd, **env)
    assert rc == 0, out[-4000:]
    assert "gloo over eth0 (from GLOO_SOCKET_IFNAME)" in out, out[-3000:]  # forwarded by the script
    losses, norms = max_rel_diff(metrics(cluster.hosts.disk("host1", str(local.parent)) / "ckpt"), one_host,
                                 range(1, HALF + 1))
    print(f"\n2 hosts (launch_multinode.sh, node-local disks) vs 1 host: max rel diff loss {losses:.2e}, "
          f"grad norm {norms:.2e}")
    assert losses <= 1e-6 and norms <= 1e-6
    disks = [cluster.hosts.disk(h, str(local.parent)) / "ckpt" for h in ("host1", "host2")]
    tag = f"global_step{HALF}"
    assert (disks[0] / tag / "complete").is_file() and not (disks[1] / tag / "complete").exists()
    assert (disks[1] / tag / "mp_rank_02_model_states.pt").is_file()  # host2 wrote its own stage's files

    rc, out = cluster.run("host1", cluster.deepspeed("--set", f"checkpoint.save={local}",
                                                     "--set", f"checkpoint.load={local}"))
    errors = error_lines(out)
    print(f"resume from node-local disks: {errors}")
    assert rc != 0 and len(errors) == 1, out[-4000:]
    assert "host host1 (ranks 0, 1): missing mp_rank_02_model_states.pt" in errors[0]
    assert "host host2 (ranks 2, 3): missing mp_rank_00_model_states.pt" in errors[0]
    assert "resumed from" not in out and "iter " not in out  # nothing trained

    gathered, universal = cluster.work / "gathered", cluster.work / "universal"
    for disk in disks:
        shutil.copytree(disk, gathered, dirs_exist_ok=True)
    done = subprocess.run([str(BIN / "mtnlg"), "checkpoint", "reshard", "--checkpoint", str(gathered), "--output",
                           str(universal)], env=cluster.env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    save = cluster.work / "shared" / "from_universal"
    rc, out = cluster.run("host1", cluster.deepspeed(
        "--set", "parallel.pipeline=1", "--set", f"checkpoint.load={universal}", "--set", f"checkpoint.save={save}",
        hostfile=cluster._hostfile("hostfile1", 1)))
    assert rc == 0, out[-4000:]
    assert "warning: tensor parallelism spans hosts (tp group ranks 0-1 on host1, host2)" in out
    assert f"resumed from iteration {HALF}" in out
    losses, norms = max_rel_diff(metrics(save), one_host, range(HALF + 1, ITERS + 1))
    print(f"resharded from both hosts' disks, resumed at tp=2 x pp=1 on 2 hosts x 1 rank: max rel diff loss "
          f"{losses:.2e}, grad norm {norms:.2e}")
    assert losses <= 1e-5 and norms <= 1e-5


def test_a_lost_host_ends_the_job_and_a_relaunch_resumes(cluster):
    """Every process of host2 is killed mid-training (its PID namespace's init): the job ends on host1 within
    train.collective_timeout_s plus a bound, with one line naming host2; a relaunch, host2 back, resumes from the
    newest complete checkpoint. One rank per host (pp=2 across them) keeps it cheap."""
    save = cluster.work / "shared" / "fault"
    one_each = cluster._hostfile("hostfile1", 1)
    layout = ("--set", "parallel.tensor=1", "--set", f"checkpoint.save={save}")
    proc = cluster.start("host1", cluster.deepspeed(*layout, "--set", "train.iters=100000",
                                                    "--set", "checkpoint.interval=2", hostfile=one_each))
    deadline = time.time() + 300
    while not (len(complete_tags(save)) >= 2 and len(metrics_lines(save)) >= 5):
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"training did not get going: {finish(proc, 10)[1][-4000:]}")
        time.sleep(0.2)
    t0 = time.time()
    cluster.hosts.kill("host2")
    rc, out = finish(proc, TIMEOUT_S + 120)
    seconds = time.time() - t0
    try:
        lost = [line for line in error_lines(out) if "lost host host2 (rank 1)" in line]
        print(f"\nlost host: the job ended {seconds:.1f}s after host2 was killed "
              f"(collective timeout {TIMEOUT_S}s): {lost}")
        # ended by itself (``finish`` fails a run still going after the timeout + 120 s), with one line naming host2
        assert rc != 0 and len(lost) == 1 and len(error_lines(out)) == 1, out[-4000:]
    finally:
        cluster.hosts.start("host2")
        cluster.hosts.wait_ready()

    newest = latest_tag(save)
    assert newest is not None and (save / newest / "complete").is_file()
    resume_at = int(newest.removeprefix("global_step"))
    relaunch = cluster.deepspeed(*layout, "--set", f"checkpoint.load={save}", "--set", f"train.iters={resume_at + 2}",
                                 hostfile=one_each)
    rc, out = cluster.run("host1", relaunch)
    assert rc == 0, out[-4000:]
    assert f"resumed from iteration {resume_at}" in out
    assert latest_tag(save) == f"global_step{resume_at + 2}"


def metrics_lines(save: Path) -> list[str]:
    path = save / "metrics.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


# ----------------------------------------------------------------------------- without processes


def test_interface_choice():
    ifaces = {"lo": "127.0.0.1", "eth0": "10.0.0.2", "ib0": "198.18.0.5"}
    assert choose_interface("198.18.0.11", ifaces, "198.18.0.5") == ("ib0", "198.18.0.5")  # routes to the master
    # on the master, whose name resolves to 127.0.1.1: the one interface that is not loopback
    assert choose_interface("host1", {"lo": "127.0.0.1", "eth0": "10.0.0.2"}, "127.0.1.1") == ("eth0", "10.0.0.2")
    with pytest.raises(Exception, match="set GLOO_SOCKET_IFNAME"):  # two candidates: say so, do not guess
        choose_interface("host1", ifaces, "127.0.1.1")


def test_tp_across_hosts_and_lost_host_message():
    hosts = [RankHost("a", "198.18.0.11")] * 2 + [RankHost("b", "198.18.0.12")] * 2
    assert tp_across_hosts(hosts, [[0, 1], [2, 3]]) is None
    assert "tp group ranks 1-2 on a, b" in tp_across_hosts(hosts, [[0], [1, 2], [3]])
    error = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [198.18.0.12]:59027: "
             "Connection reset by peer. This is typically caused by a rank crash")
    message = lost_contact_message(error, hosts, "0")
    assert "lost host b (ranks 2-3): Read error [198.18.0.12]:59027: Connection reset by peer;" in message
    assert "lost contact with the other ranks" in lost_contact_message("Timed out waiting", hosts[:1], "0")
    start = lost_contact_message("Gloo connectFullMesh failed with [pair.h:311] Connect timeout [none]", hosts, "2")
    assert "could not connect to the other ranks at start-up" in start and "GLOO_SOCKET_IFNAME must name" in start


def test_a_lost_contact_is_reported_by_one_rank_per_host(monkeypatch):
    """The ranks of a host share their launcher (parent pid) and port: the first to ask speaks, the rest are quiet."""
    from mtnlg.cli import _first_on_this_host, _quiet_rank
    from mtnlg.errors import LostContact

    monkeypatch.setenv("MASTER_PORT", f"test{os.getpid()}")
    what = f"test-{time.time_ns()}"
    try:
        assert _first_on_this_host(what) and not _first_on_this_host(what)
    finally:
        for f in Path("/dev/shm").glob(f"mtnlg-{what}-*"):
            f.unlink()
    assert not _quiet_rank(LostContact("x")) and _quiet_rank(LostContact("x"))
    for f in Path("/dev/shm").glob(f"mtnlg-lost-contact-*-test{os.getpid()}"):
        f.unlink()


def test_a_quiet_rank_leaves_once_rank_0_has_reported(monkeypatch):
    """A config error every rank raises: rank 1 (on rank 0's host) stays until rank 0 has printed it, however late
    (its exit would make the launcher stop rank 0 first); on another host it leaves after a short pause."""
    import threading

    from mtnlg import cli
    from mtnlg.errors import JobError

    monkeypatch.setenv("MASTER_PORT", f"test{os.getpid()}")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli, "QUIET_RANK_REMOTE_PAUSE_S", 0.0)
    marker = Path(cli._marker_path(cli._report_marker(JobError("x"))))
    try:
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("LOCAL_RANK", "1")
        assert cli._quiet_rank(JobError("x"))
        rank0 = threading.Timer(4.0, lambda: cli._first_on_this_host(cli._report_marker(JobError("x"))))
        t0 = time.monotonic()
        rank0.start()
        cli._wait_for_report(JobError("x"))
        waited = time.monotonic() - t0
        assert marker.exists() and 4.0 <= waited < 30, waited
        monkeypatch.setenv("LOCAL_RANK", "0")  # rank 1 is the first rank of the second host
        marker.unlink()
        t0 = time.monotonic()
        cli._wait_for_report(JobError("x"))
        assert time.monotonic() - t0 < 2 and not marker.exists()
    finally:
        marker.unlink(missing_ok=True)
