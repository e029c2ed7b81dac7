"""Test-session hygiene: DeepSpeed's CPU all-reduce keeps a 67 MB buffer per rank in /dev/shm
(``deepspeed_allreduce_buffer_*``) and a rank that is killed never removes its own. The fault
tests kill ranks on purpose; this removes the buffers they leave, so a long session does not fill
the machine's shared memory."""

from __future__ import annotations

import time
from pathlib import Path

SHM = Path("/dev/shm")
PATTERN = "deepspeed_allreduce_buffer_*"
MARKERS = "mtnlg-lost-contact-*"  # the CLI's one-report-per-host markers (0 bytes) from fault tests
_started = time.time()


def _mapped() -> set[str]:
    """Paths of /dev/shm files some live process still maps."""
    paths: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        paths.update(line.split(maxsplit=5)[-1] for line in text.splitlines() if "/dev/shm/" in line)
    return paths


def pytest_sessionfinish(session, exitstatus):
    if not SHM.is_dir():
        return
    for f in SHM.glob(MARKERS):
        try:
            if f.stat().st_mtime >= _started - 1:
                f.unlink()
        except OSError:
            pass
    mapped = _mapped()
    for f in SHM.glob(PATTERN):
        try:
            if f.stat().st_mtime >= _started - 1 and str(f) not in mapped:
                f.unlink()
        except OSError:
            pass
