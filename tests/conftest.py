"""The test session: an offline environment, the markers (``multirank``, ``multihost``, ``slow``) that make a quick
inner loop one command, and hygiene.

    bash scripts/test.sh                                            # everything (what CI runs), 2 workers
    bash scripts/test.sh -m "not multirank and not multihost and not slow"   # the inner loop: one process each

A test is ``multirank`` when it (or a fixture it uses) starts ranks: ``run_distributed``, or a launcher
(``deepspeed``, ``torchrun``, ``accelerate``) or a multi-rank CLI run; ``multihost`` when it stands up simulated
hosts (``tests/hosts.py``). Both are found from the source, so a new test is marked without anyone remembering to;
``slow`` is set by hand on single tests that take long anyway.

Parallel workers (``-n 2``) take whole files, the slowest first (``FILE_SECONDS``), so that neither worker is left
alone with a long file at the end.

Hygiene: the fault tests kill ranks on purpose; the CLI's one-report-per-host markers they leave in /dev/shm
(``mtnlg-lost-contact-*``) are removed at the end."""

from __future__ import annotations

import inspect
import os
import re
import time
from pathlib import Path

import pytest

# nothing from a model or data hub, ever (spawned ranks and subprocesses inherit it)
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MARKERS = {
    "multirank": "starts several ranks (run_distributed, a launcher, or a multi-rank run)",
    "multihost": "stands up simulated hosts (network namespaces, sshd)",
    "slow": "takes long on 2 cores even alone",
}
_MULTIRANK = re.compile(r"run_distributed\(|\"deepspeed\"|\"torchrun\"|\"accelerate\"|_launch\(|launch_ranks\(")
_MULTIHOST = re.compile(r"SimHosts\(")
_CALL = re.compile(r"\b([A-Za-z_]\w*)\(")


# what a launcher (or an in-process `mtnlg train`, which sets them for one rank) leaves in the environment
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
               "CROSS_SIZE", "LOCAL_SIZE")


@pytest.fixture(autouse=True)
def _no_process_group_left_behind():
    """A test that runs `mtnlg train` (or anything that initialises torch.distributed) in the pytest process leaves
    a process group listening on MASTER_PORT and the launcher variables in os.environ, which every later subprocess
    inherits (its rendezvous then fails: the port is taken). Destroy what the test made and put the variables
    back; a group a wider fixture made before the test stays."""
    import sys

    before = {k: os.environ.get(k) for k in LAUNCH_VARS}
    dist = sys.modules.get("torch.distributed")
    had_group = dist is not None and dist.is_available() and dist.is_initialized()
    yield
    dist = sys.modules.get("torch.distributed")
    if not had_group and dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def pytest_configure(config):
    for name, what in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")


def _sources(item) -> str:
    """The test function's source and that of every fixture it uses (module fixtures included)."""
    parts = []
    funcs = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(info, "names_closure", []):
        for fixdef in (info.name2fixturedefs.get(name) or []):
            funcs.append(fixdef.func)
    seen: set = set()
    while funcs:  # and the test modules' own functions they call (e.g. a fixture's helper that starts the ranks)
        f = funcs.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        try:
            src = inspect.getsource(f)
        except (OSError, TypeError):
            continue
        parts.append(src)
        names = getattr(f, "__globals__", {})
        for called in _CALL.findall(src):
            g = names.get(called)
            if inspect.isfunction(g) and (g.__module__ or "").startswith("tests."):
                funcs.append(g)
    return "\n".join(parts)


# seconds each file took in a full run (``--durations=0``, summed per file; 2 workers, 2026-12-07): files start slowest
# first, the rest in name order. Stale figures only cost balance, never correctness.
FILE_SECONDS = {
    "test_bench.py": 321, "test_multihost.py": 220, "test_reshard.py": 190, "test_bad_inputs.py": 162,
    "test_eval.py": 159, "test_faults.py": 156, "test_sequence_parallel.py": 134, "test_launchers.py": 122,
    "test_precision.py": 113, "test_stopping.py": 101, "test_training.py": 95, "test_construction.py": 94,
    "test_curate.py": 87, "test_bert.py": 84, "test_serve.py": 81, "test_convert_train.py": 52,
    "test_checkpoints.py": 51, "test_t5.py": 51, "test_accelerate.py": 46, "test_sft.py": 44,
    "test_convert_hf.py": 37, "test_contracts.py": 25, "test_data_training.py": 22,
}


def _file_weight(item) -> float:
    return FILE_SECONDS.get(item.nodeid.split("::", 1)[0].removeprefix("tests/"), 0.0)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_file_weight, reverse=True)  # stable: a file's tests keep their order
    for item in items:
        src = _sources(item)
        hosts = _MULTIHOST.search(src) or "cluster" in getattr(item, "fixturenames", ())
        if hosts:
            item.add_marker(pytest.mark.multihost)
        if hosts or _MULTIRANK.search(src):
            item.add_marker(pytest.mark.multirank)


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # without pytest-xdist the suite runs in one process (MTNLG_TEST_WORKERS=0)
    pass
else:
    class _FileScheduling(LoadScopeScheduling):
        """Parallel workers (``pytest -n N``): a test file's tests run on one worker (its module fixtures are
        built once) and every file that stands up simulated hosts runs on the same one (their bridges share one
        private subnet), in place of pytest-xdist's ``--dist loadgroup``, whose marks pytest 9.2's node ids no
        longer carry."""

        def __init__(self, config, log=None):
            super().__init__(config, log)
            config.option.loadscopereorder = False  # files in collection order (slowest first), not by test count
            tests = Path(__file__).resolve().parent
            self._netns = {f"tests/{p.name}" for p in tests.glob("test_*.py") if "SimHosts(" in p.read_text()}

        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return "simulated hosts" if file in self._netns else file

    def pytest_xdist_make_scheduler(config, log):
        return _FileScheduling(config, log)


SHM = Path("/dev/shm")
# the CLI's report markers (0 bytes, ``cli._marker_path``) of the multi-rank error and fault tests
REPORT_MARKERS = ("mtnlg-lost-contact-*", "mtnlg-error-reported-*")
_started = time.time()


def pytest_sessionfinish(session, exitstatus):
    if not SHM.is_dir() or hasattr(session.config, "workerinput"):
        return  # a parallel worker: the controlling process cleans up once all of them are done
    for f in (f for pattern in REPORT_MARKERS for f in SHM.glob(pattern)):
        try:
            if f.stat().st_mtime >= _started - 1:
                f.unlink()
        except OSError:
            pass
