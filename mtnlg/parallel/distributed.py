"""Start torch.distributed the way the launchers expect, or as a single process.

- ``deepspeed --num_gpus N script`` and ``torchrun --nproc_per_node N script`` set RANK,
  LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (the former also passes --local_rank);
- a plain ``mtnlg train`` is world size 1 on a free local port.
The backend is the accelerator's (NCCL on NVIDIA GPUs, gloo on CPU), chosen by DeepSpeed.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import io
import logging
import os
import socket
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def _free_port() -> int:
    """A free port for a one-process run's rendezvous, below Linux's ephemeral range (32768-60999): a port the
    kernel picks (bind to 0) is ephemeral, and any outgoing connection on the machine (gloo opens many) may take it
    between this check and the rendezvous listening on it ("server socket has failed to listen")."""
    import random

    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("", port))  # as the rendezvous will (all interfaces): not in use, not in TIME_WAIT
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded machine: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ONE_PROCESS_MARK = "MTNLG_ONE_PROCESS_RUN"


def under_launcher() -> bool:
    """Whether a launcher (deepspeed, torchrun, mpirun via DeepSpeed) set this process's rank. A one-process run sets
    RANK, WORLD_SIZE and MASTER_PORT itself, and a process it starts (a test calling `mtnlg train`, a Python API user
    running a command) inherits them: that child is not under a launcher, and must not rendezvous on the parent's
    port, which the parent's group still holds ("server socket has failed to listen"). The parent marks them with
    its pid and port; a launcher sets a MASTER_PORT of its own."""
    if "RANK" not in os.environ:
        return False
    pid, _, port = os.environ.get(ONE_PROCESS_MARK, "").partition(":")
    inherited = pid.isdigit() and int(pid) != os.getpid() and os.environ.get("MASTER_PORT") == port
    return not inherited


def local_world_size() -> int:
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


@contextlib.contextmanager
def deepspeed_output(show: bool = False):
    """Keep DeepSpeed's set-up prints (topology, layer seeds, memory reports per optimizer group, op builds: bare
    ``print``s, some on every rank) off the console unless ``show``; they are shown after all if the body fails."""
    if show:
        yield
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    except BaseException:
        sys.stdout.write(captured.getvalue())
        raise


class _DropKnownWarnings(logging.Filter):
    """DeepSpeed warnings about choices mtnlg makes on purpose (its own optimizer classes under ZeRO)."""

    KNOWN = ("You are using ZeRO with an untested optimizer",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(k in record.getMessage() for k in self.KNOWN)


def deepspeed_logging(show: bool = False) -> None:
    """DeepSpeed's logger: INFO and up when ``show`` (``logging.deepspeed: info``), else warnings and errors
    without the known ones."""
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.INFO if show else logging.WARNING)
    for f in [f for f in ds_logger.filters if isinstance(f, _DropKnownWarnings)]:
        ds_logger.removeFilter(f)
    if not show:
        ds_logger.addFilter(_DropKnownWarnings())


def init_distributed(timeout_s: float = 1800, show_deepspeed: bool = False) -> torch.device:
    """Initialise the default process group (once) and return this rank's device. ``show_deepspeed``: let
    DeepSpeed's console output through (``logging.deepspeed: info``)."""
    if not under_launcher():
        port = str(_free_port())
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_PORT=port)
        os.environ[ONE_PROCESS_MARK] = f"{os.getpid()}:{port}"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed_logging(show_deepspeed)  # mtnlg does the logging

    accel = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accel.device_name() == "cpu":
        if "OMP_NUM_THREADS" not in os.environ:  # ranks on one host share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world_size(), 1)))
        device = torch.device("cpu")
        keep_freed_memory()
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(local_rank))
    # Groups made later by dist.new_group (ours and DeepSpeed's pipeline/data groups) take torch's
    # default timeout (30 min), not the world group's: make that default the job's timeout too.
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = datetime.timedelta(seconds=timeout_s)
    distributed_c10d.default_pg_nccl_timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if accel.communication_backend_name() == "gloo":
            from mtnlg.parallel.hosts import set_gloo_interface

            set_gloo_interface()  # a job across hosts: the interface facing them, not loopback
        if accel.device_name() == "cpu":
            from mtnlg.deepspeed_compat import skip_shm_comm_op

            skip_shm_comm_op()  # an op mtnlg does not use: no C++ build, no 67 MB per rank in /dev/shm
        with deepspeed_output(show_deepspeed):
            deepspeed.init_distributed(
                dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False, verbose=False,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
    return device


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default every block over 32 MB (activations, logits chunks, a 39M-row embedding gradient,
    fp32 copies of gradients) is mmap'ed on allocation and unmapped on free, so the next micro batch
    faults its pages in again and the kernel zeroes them (the cost: benchmarks/README.md). Serving all sizes
    from the heap and
    not trimming it costs nothing but keeping the high-water mark resident, which training reaches
    every step anyway. Linux/glibc only; ``MTNLG_KEEP_FREED_MEMORY=0`` turns it off. Returns whether
    it took effect."""
    if os.environ.get("MTNLG_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


_COMM_SIGNS = ("Connection closed by peer", "Connection reset by peer", "timed out", "Timed out", "Broken pipe",
               "NCCL communicator was aborted", "Socket Timeout", "Connect timeout", "connectFullMesh")


def in_collective(e: BaseException) -> bool:
    """Whether ``e`` was raised inside torch.distributed (a collective or point-to-point op): the one place a peer's
    death or hang shows up. An error elsewhere whose text happens to say "timed out" or "Broken pipe" (a file
    system, a subprocess, a tokenizer) is not one."""
    if isinstance(e, (dist.DistBackendError, dist.DistNetworkError)):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    comm = (f"torch{os.sep}distributed{os.sep}", f"deepspeed{os.sep}comm{os.sep}", f"pipe{os.sep}p2p.py")
    return any(c in f.filename for f in frames for c in comm)


def comm_failure(e: BaseException) -> str | None:
    """A one-line explanation when ``e`` is a collective that failed because another rank died or hung, else None.
    The original error and its traceback go to a debug log (its path ends the line), so nothing is lost."""
    text = str(e)
    if not (in_collective(e) and (isinstance(e, (dist.DistBackendError, dist.DistNetworkError))
                                  or any(s in text for s in _COMM_SIGNS))):
        return None
    from mtnlg.parallel.hosts import job_hosts, lost_contact_message

    rank = os.environ.get("RANK", "?")
    log = Path(tempfile.gettempdir()) / f"mtnlg-lost-contact-rank{rank}-{os.getpid()}.log"
    try:
        log.write_text("".join(traceback.format_exception(e)))
        where = f" (the error's traceback: {log})"
    except OSError:
        where = ""
    return lost_contact_message(text or type(e).__name__, job_hosts(), rank) + where
