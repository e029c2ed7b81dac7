"""Simulated hosts for multi-node tests: Linux namespaces on one machine standing in for cluster nodes.

Each host is a network namespace with its own veth on a private bridge (addresses from 198.18.0.0/24, a
range reserved for network tests; the bridge has no address outside the namespaces, so nothing leaves
it), its own hostname (UTS namespace), its own PID namespace (DeepSpeed's runner ``pkill -f``s its
launcher on every host on Ctrl-C; here that reaches only the host's own processes), its own ``/dev/shm``
and ``/etc/hosts``, optionally its own directory at given paths (a node-local disk: a bind mount of a
distinct directory per host), and an sshd (Debian's ``openssh-server``) with keys made for the run. The
sshd is the host's init: killing it kills every process of the host, as a lost node would.

    with SimHosts(2, workdir, private=["/tmp/x/local"]) as hosts:
        hosts.names                      # ['host1', 'host2']
        hosts.addr("host1")              # '198.18.0.11'
        proc = hosts.popen("host1", ["deepspeed", "--hostfile", ...], env={**hosts.ssh_env(), ...})
        hosts.kill("host2")              # every process of host2 ends at once

``hosts.ssh_env()`` puts a ``ssh`` wrapper first on PATH that uses the run's own client config and
known_hosts (``ssh -F``), so root's ``~/.ssh`` is never read or written. By hand (root):

    python -m tests.hosts up --hosts 2 --dir /tmp/sim [--private /tmp/sim/local]
    python -m tests.hosts run --dir /tmp/sim host1 -- ssh host2 hostname
    python -m tests.hosts down --dir /tmp/sim
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

NET = "198.18.0"  # RFC 2544 benchmarking range: never routed, only on the bridge made here
PACKAGES = {"/usr/sbin/sshd": "openssh-server", "/usr/bin/pdsh": "pdsh"}


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def why_unavailable() -> str | None:
    """None when this machine can simulate hosts (root, ``ip netns``, ``unshare``, ``nsenter``), else why not."""
    if sys.platform != "linux":
        return "simulated hosts need Linux namespaces"
    if os.geteuid() != 0:
        return "simulated hosts need root (network namespaces, bridges, mounts)"
    for tool in ("ip", "unshare", "nsenter", "ssh-keygen"):
        if not shutil.which(tool):
            return f"simulated hosts need '{tool}' (packages iproute2, util-linux, openssh-client)"
    probe = f"mtnlg-probe-{os.getpid()}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode:
        return f"'ip netns add' fails here: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def ensure_packages() -> str | None:
    """None when the Debian packages the hosts need are installed (``openssh-server`` for sshd, ``pdsh`` for
    DeepSpeed's default multi-node runner), else what to run. Installing them is a setup step of the test command
    (``scripts/setup_system.sh``, which ``scripts/test.sh`` runs), never done by a test."""
    missing = sorted({pkg for path, pkg in PACKAGES.items() if not Path(path).exists()})
    if not missing:
        return None
    return f"needs Debian packages {', '.join(missing)}: run `bash scripts/setup_system.sh` (as root) first"


class SimHosts:
    """``n`` simulated hosts named host1..hostN at 198.18.0.11, .12, ...; ``private``: paths at which every host sees
    its own directory (``<workdir>/disk-<host>/<index>``), as node-local disks."""

    def __init__(self, n: int, workdir: str | Path, private: list[str] | tuple[str, ...] = ()):
        if not 1 <= n <= 200:
            raise ValueError("1 to 200 hosts")
        self.workdir = Path(workdir).resolve()
        self.names = [f"host{i}" for i in range(1, n + 1)]
        self.private = [str(Path(p).resolve()) for p in private]
        token = f"{os.getpid() % 100000:05d}"
        self.bridge = f"mtb{token}"
        self.netns = {h: f"mtnlg-{token}-{h}" for h in self.names}
        self.pids: dict[str, int] = {}  # host -> pid (in this namespace) of its init, the sshd

    # ------------------------------------------------------------------ addresses and files
    def addr(self, host: str) -> str:
        return f"{NET}.{10 + self.names.index(host) + 1}"

    def disk(self, host: str, path: str) -> Path:
        """The directory that ``host`` sees at the private ``path``."""
        return self.workdir / f"disk-{host}" / str(self.private.index(str(Path(path).resolve())))

    @property
    def ssh_dir(self) -> Path:
        return self.workdir / "ssh"

    def ssh_env(self) -> dict[str, str]:
        """Environment for a process that ssh-es into the hosts (DeepSpeed's runner, pdsh): our ``ssh`` first on
        PATH."""
        return {"PATH": f"{self.workdir / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def _write_ssh_files(self) -> None:
        d = self.ssh_dir
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        for key in ("host_key", "id_key"):
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"mtnlg-test-{key}", "-f", str(d / key))
        (d / "authorized_keys").write_text((d / "id_key.pub").read_text())
        host_pub = " ".join((d / "host_key.pub").read_text().split()[:2])
        (d / "known_hosts").write_text("".join(
            f"{h},{self.addr(h)},127.0.1.1 {host_pub}\n" for h in self.names))
        (d / "sshd_config").write_text(
            f"Port 22\nListenAddress 0.0.0.0\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nPidFile none\nPrintMotd no\nLogLevel ERROR\n")
        (d / "ssh_config").write_text("".join(f"Host {h}\n  HostName {self.addr(h)}\n" for h in self.names) + (
            f"Host *\n  User root\n  IdentityFile {d / 'id_key'}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {d / 'known_hosts'}\n  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n  BatchMode yes\n  LogLevel ERROR\n  ConnectTimeout 10\n"
            "  ServerAliveInterval 5\n  ServerAliveCountMax 3\n"))
        for f in d.iterdir():
            f.chmod(0o600)
        wrapper = self.workdir / "bin" / "ssh"
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {d / "ssh_config"} "$@"\n')
        wrapper.chmod(0o755)

    def _hosts_file(self, host: str) -> Path:
        """The host's /etc/hosts: every host by address, but first, as Debian writes it, its own name on 127.0.1.1
        (so a process that binds to "its hostname" binds to loopback: the classic multi-node trap)."""
        path = self.workdir / f"hosts-{host}"
        path.write_text(f"127.0.0.1 localhost\n127.0.1.1 {host}\n"
                        + "".join(f"{self.addr(h)} {h}\n" for h in self.names))
        return path

    # ------------------------------------------------------------------ lifecycle
    def up(self) -> SimHosts:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._write_ssh_files()
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "link", "set", self.bridge, "up")
            for i, host in enumerate(self.names, 1):
                ns, veth = self.netns[host], f"{self.bridge}v{i}"
                _run("ip", "netns", "add", ns)
                _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _run("ip", "link", "set", veth, "master", self.bridge, "up")
                for cmd in (["addr", "add", f"{self.addr(host)}/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                            ["link", "set", "lo", "up"]):
                    _run("ip", "-n", ns, *cmd)
                self.start(host)
            self.wait_ready()
            self._save_state()
        except BaseException:
            self.down()
            raise
        return self

    def start(self, host: str) -> None:
        """(Re)start a host's namespaces and its sshd (its init)."""
        resolv = self.workdir / "resolv.conf"  # no name server: lookups end at once, none leaves the host
        resolv.write_text("options timeout:1 attempts:1\n")
        mounts = [f"mount --bind {self._hosts_file(host)} /etc/hosts", f"mount --bind {resolv} /etc/resolv.conf",
                  "mount -t tmpfs -o size=1g tmpfs /dev/shm"]
        for path in self.private:
            src = self.disk(host, path)
            src.mkdir(parents=True, exist_ok=True)
            Path(path).mkdir(parents=True, exist_ok=True)
            mounts.append(f"mount --bind {src} {path}")
        script = "; ".join(["set -e", f"hostname {host}", *mounts, "mkdir -p /run/sshd",
                            f"exec /usr/sbin/sshd -D -e -f {self.ssh_dir / 'sshd_config'}"])
        log = open(self.workdir / f"sshd-{host}.log", "ab")
        unshare = subprocess.Popen(
            ["ip", "netns", "exec", self.netns[host], "unshare", "--uts", "--pid", "--fork", "--kill-child",
             "--mount-proc", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.time() + 20
        while time.time() < deadline:
            kids = _children(unshare.pid)
            if kids and Path(f"/proc/{kids[0]}/exe").resolve().name == "sshd":
                self.pids[host] = kids[0]
                return
            if unshare.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{host}: sshd did not start ({(self.workdir / f'sshd-{host}.log').read_text()[-500:]})")

    def wait_ready(self, timeout: float = 30) -> None:
        """Until the first host reaches every host over ssh (hostname answered by the host itself)."""
        first = self.names[0]
        for host in self.names:
            deadline = time.time() + timeout
            while True:
                done = subprocess.run(self.command(first, ["ssh", host, "hostname"]), capture_output=True, text=True,
                                      env={**os.environ, **self.ssh_env()}, timeout=timeout)
                if done.stdout.strip() == host:
                    break
                if time.time() > deadline:
                    raise RuntimeError(f"ssh {first} -> {host} failed: {done.stderr.strip()[-300:]}")
                time.sleep(0.2)

    def command(self, host: str, cmd: list[str], cwd: str | Path | None = None) -> list[str]:
        """``cmd`` as a process of ``host``: in its network, UTS, PID and mount namespaces."""
        wd = [f"--wd={cwd}"] if cwd else []
        return ["nsenter", f"--target={self.pids[host]}", "--net", "--uts", "--pid", "--mount", *wd, "--", *cmd]

    def popen(self, host: str, cmd: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None,
              **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(host, cmd, cwd or os.getcwd()), env=env, **kwargs)

    def kill(self, host: str) -> None:
        """SIGKILL the host's init: the kernel ends every process in its PID namespace with it."""
        pid = self.pids.pop(host)
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)

    def down(self) -> None:
        """Stop every host (and so every process started on one), remove the namespaces and the bridge. Safe to call
        twice, and on a half-made set-up."""
        for host in list(self.pids):
            try:
                self.kill(host)
            except ProcessLookupError:
                self.pids.pop(host, None)
        for ns in self.netns.values():
            _run("ip", "netns", "del", ns, check=False)  # takes its end of the veth pair with it
        _run("ip", "link", "del", self.bridge, check=False)
        (self.workdir / "state.json").unlink(missing_ok=True)

    def __enter__(self) -> SimHosts:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # ------------------------------------------------------------------ by hand: state across commands
    def _save_state(self) -> None:
        state = {"names": self.names, "private": self.private, "bridge": self.bridge, "netns": self.netns,
                 "pids": self.pids}
        (self.workdir / "state.json").write_text(json.dumps(state))

    @classmethod
    def load(cls, workdir: str | Path) -> SimHosts:
        state = json.loads((Path(workdir) / "state.json").read_text())
        hosts = cls(len(state["names"]), workdir, state["private"])
        hosts.bridge, hosts.netns, hosts.pids = state["bridge"], state["netns"], state["pids"]
        return hosts


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it if it was ours
        except ChildProcessError:
            pass
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.hosts", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start the hosts (they run until `down`)")
    up.add_argument("--hosts", type=int, default=2)
    up.add_argument("--private", action="append", default=[], metavar="PATH",
                    help="a path at which each host sees its own directory (repeatable)")
    run = sub.add_parser("run", help="run a command on a host")
    run.add_argument("host")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    sub.add_parser("down", help="stop the hosts and remove their namespaces and bridge")
    for s in sub.choices.values():
        s.add_argument("--dir", required=True, help="working directory (keys, configs, logs, state)")
    args = p.parse_args(argv)
    if args.action == "up":
        why = why_unavailable() or ensure_packages()
        if why:
            print(f"cannot simulate hosts: {why}", file=sys.stderr)
            return 2
        hosts = SimHosts(args.hosts, args.dir, args.private).up()
        for h in hosts.names:
            print(f"{h} {hosts.addr(h)} (init pid {hosts.pids[h]})")
        print(f"hostfile lines: {' / '.join(f'{h} slots=N' for h in hosts.names)}; ssh wrapper: {args.dir}/bin/ssh")
        return 0
    hosts = SimHosts.load(args.dir)
    if args.action == "down":
        hosts.down()
        return 0
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    env = {**os.environ, **hosts.ssh_env()}
    return subprocess.run(hosts.command(args.host, cmd or ["bash"], os.getcwd()), env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
