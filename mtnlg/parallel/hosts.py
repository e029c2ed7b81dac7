"""The hosts of a multi-node job: which network interface gloo uses, which rank runs where, Megatron's rule that
tensor parallelism stays inside a host, and which host a failed collective lost.

Without ``GLOO_SOCKET_IFNAME`` gloo binds to the address its hostname resolves to; on many clusters (Debian and
Ubuntu write ``127.0.1.1 <hostname>`` into /etc/hosts) that is loopback, and ranks on other hosts can never
connect. For a job spanning hosts mtnlg therefore picks the interface that routes to ``MASTER_ADDR`` (or, on the
master host itself, the one non-loopback interface) unless the variable is set.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import socket
import struct
from dataclasses import dataclass

import torch.distributed as dist

from mtnlg.errors import UserError

SIOCGIFADDR = 0x8915


@dataclass(frozen=True)
class RankHost:
    hostname: str
    address: str  # the IPv4 address this rank's gloo/NCCL sockets use ('' when unknown)


def interface_addresses() -> dict[str, str]:
    """Every network interface of this host with an IPv4 address: name -> address (Linux)."""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address (or down)
                continue
            out[name] = socket.inet_ntoa(packed[20:24])
    return out


def route_source(host: str) -> str | None:
    """The local address the kernel would send from to reach ``host`` (a UDP connect sends nothing)."""
    try:
        target = socket.gethostbyname(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def choose_interface(master: str, interfaces: dict[str, str] | None = None,
                     source: str | None = None) -> tuple[str, str]:
    """(interface, address) that the other hosts reach this one on: the one routing to ``master``, or, where that is
    loopback (this is the master and its name resolves to 127.x), the only non-loopback one. A one-line error when
    there is no way to tell."""
    interfaces = interface_addresses() if interfaces is None else interfaces
    source = route_source(master) if source is None else source
    outside = {n: a for n, a in interfaces.items() if not ipaddress.ip_address(a).is_loopback}
    if source and not ipaddress.ip_address(source).is_loopback:
        for name, addr in interfaces.items():
            if addr == source:
                return name, addr
    if len(outside) == 1:
        return next(iter(outside.items()))
    raise UserError(f"this job spans hosts, but mtnlg cannot tell which network interface of "
                    f"{socket.gethostname()} the others reach (MASTER_ADDR={master} routes via {source or '?'}; "
                    f"interfaces: {', '.join(f'{n} {a}' for n, a in interfaces.items()) or 'none'}); set "
                    "GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME on GPUs) to the cluster network's interface, "
                    "e.g. in .deepspeed_env")


def spans_hosts() -> bool:
    """Whether this launch has ranks on more than one host (launcher variables, before torch.distributed starts)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 0)
    return local > 0 and int(os.environ.get("WORLD_SIZE", "1")) > local


def set_gloo_interface() -> str | None:
    """For a job spanning hosts: set ``GLOO_SOCKET_IFNAME`` (unless the user did) to the interface facing the other
    hosts. Returns the interface gloo will use (None: gloo decides, single host)."""
    global _gloo_source
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        _gloo_source = "from GLOO_SOCKET_IFNAME"
        return os.environ["GLOO_SOCKET_IFNAME"]
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if not spans_hosts() or _is_loopback_literal(master):  # a loopback master: every rank is on this machine
        return None
    name, addr = choose_interface(master)
    os.environ["GLOO_SOCKET_IFNAME"] = name
    _gloo_source = f"{addr}, chosen by mtnlg; GLOO_SOCKET_IFNAME overrides"
    return name


_gloo_source: str | None = None  # how set_gloo_interface picked the interface, for the start-up line


def gloo_interface() -> str | None:
    """'eth0 (from GLOO_SOCKET_IFNAME)' or 'eth0 (198.18.0.11, chosen by mtnlg; ...)'; None when gloo decides."""
    name = os.environ.get("GLOO_SOCKET_IFNAME")
    return f"{name} ({_gloo_source})" if name and _gloo_source else name


def _is_loopback_literal(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name
        return host == "localhost"


def my_address() -> str:
    """This rank's address on the job's network: the address of GLOO_SOCKET_IFNAME (its first interface) or, failing
    that, the source address towards MASTER_ADDR."""
    name = (os.environ.get("GLOO_SOCKET_IFNAME") or "").split(",")[0]
    found = interface_addresses().get(name) if name else None
    return found or route_source(os.environ.get("MASTER_ADDR", "127.0.0.1")) or ""


# ----------------------------------------------------------------------------- what the job looks like

_job_hosts: list[RankHost] | None = None  # set once per process by gather_hosts; read when a collective fails


def gather_hosts() -> list[RankHost]:
    """Every rank's host (a collective when torch.distributed runs); kept for naming a lost host later."""
    global _job_hosts
    mine = RankHost(socket.gethostname(), my_address())
    hosts = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        hosts = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, mine)
    _job_hosts = hosts
    return hosts


def job_hosts() -> list[RankHost] | None:
    return _job_hosts



def describe_hosts(hosts: list[RankHost]) -> str:
    """'host1 (ranks 0-1), host2 (ranks 2-3)'."""
    by_host: dict[str, list[int]] = {}
    for rank, h in enumerate(hosts):
        by_host.setdefault(h.hostname, []).append(rank)
    return ", ".join(f"{name} ({_ranks(ranks)})" for name, ranks in by_host.items())


def _ranks(ranks: list[int]) -> str:
    if len(ranks) > 1 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def tp_across_hosts(hosts: list[RankHost], tp_groups: list[list[int]]) -> str | None:
    """Megatron's rule: a tensor-parallel group all-reduces in every layer, so it belongs inside one host (NVLink,
    shared memory). A one-line warning naming the first group that spans hosts, or None."""
    for group in tp_groups:
        names = list(dict.fromkeys(hosts[r].hostname for r in group))
        if len(names) > 1:
            return (f"warning: tensor parallelism spans hosts (tp group {_ranks(group)} on {', '.join(names)}): "
                    "every layer's all-reduce crosses the network; make parallel.tensor divide the ranks per host")
    return None


_ADDRESS = re.compile(r"\[?(\d{1,3}(?:\.\d{1,3}){3})\]?:\d+")


def lost_hosts(error_text: str, hosts: list[RankHost], me: str) -> list[str]:
    """The hosts (other than ``me``) whose addresses a failed collective's error names (gloo says 'Connection closed
    by peer [ADDRESS]:PORT')."""
    seen = set(_ADDRESS.findall(error_text))
    found = [h.hostname for h in hosts if h.address in seen and h.hostname != me]
    return list(dict.fromkeys(found))


def lost_contact_message(error_text: str, hosts: list[RankHost] | None, rank: str) -> str:
    """One line for a collective that failed because another rank died or hung: the host it lost when the error
    tells (naming its ranks), else which hosts the job ran on."""
    first = next((line.strip() for line in error_text.splitlines() if line.strip()), "collective failed")
    first = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", first)  # gloo's source location
    first = first.split(". ")[0][:160]
    me = socket.gethostname()
    lost = lost_hosts(error_text, hosts or [], me)
    if "connectFullMesh" in error_text:  # before the first step: the ranks never reached each other
        iface = os.environ.get("GLOO_SOCKET_IFNAME", "")
        return (f"rank {rank} on {me} could not connect to the other ranks at start-up ({first}); gloo "
                f"{'used ' + iface if iface else 'bound to the address its hostname resolves to'}: on a cluster "
                "GLOO_SOCKET_IFNAME must name the interface the hosts reach each other on")
    if lost:
        names = [h for h in (hosts or []) if h.hostname in lost]
        who = ", ".join(f"{name} ({_ranks([r for r, h in enumerate(hosts) if h.hostname == name])})"
                        for name in dict.fromkeys(h.hostname for h in names))
        what = f"lost host {who}"
    elif hosts and len({h.hostname for h in hosts}) > 1:
        what = f"lost contact with the other ranks (job on {describe_hosts(hosts)})"
    else:
        what = "lost contact with the other ranks"
    return (f"rank {rank} on {me} {what}: {first}; another rank died or hung, so this job stops; resume from "
            "the last checkpoint (see train.collective_timeout_s)")
