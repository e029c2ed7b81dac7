"""glibc keeps freed host memory for reuse after ``init_distributed`` (CPU): big blocks are not mapped
and unmapped (and their pages faulted in and zeroed again) at every micro batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import ctypes, resource, sys
from mtnlg.parallel.distributed import keep_freed_memory
print(keep_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
faults = []
for _ in range(4):  # a 160 MB block, as a micro batch's activations or gradient copies would be
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(160_000_000)
    ctypes.memset(p, 1, 160_000_000)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def _faults(env: dict) -> tuple[bool, list[int]]:
    out = subprocess.run([sys.executable, "-c", SCRIPT], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True).stdout.strip().split("\n")[-2:]  # after anything DeepSpeed logs on import
    return out[0] == "True", [int(x) for x in out[1].split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults():
    took, faults = _faults({})
    assert took
    pages = 160_000_000 // os.sysconf("SC_PAGE_SIZE")
    assert faults[0] > pages // 2  # the first time the pages are new
    assert max(faults[1:]) < pages // 20, faults  # then the same pages come back

    took, faults = _faults({"MTNLG_KEEP_FREED_MEMORY": "0"})  # glibc's default: unmapped on free
    assert not took
    assert min(faults) > pages // 2, faults
