"""The ``--task`` names and their modules: one line per task. A task's module (and numpy with it) is imported when
the task is used, so that command-line help can list the names without it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mtnlg.errors import UserError

if TYPE_CHECKING:
    from mtnlg.tasks.common import Task

MODULES = {  # --task name -> module in mtnlg.tasks (its TASK)
    "mnli": "mnli",
    "qqp": "qqp",
    "race": "race",
    "squad": "squad",
    "classify": "classify",
    "multiple-choice": "multiple_choice",
}
NAMES = tuple(MODULES)


def get_task(name: str) -> Task:
    if name not in MODULES:
        raise UserError(f"--task {name!r} is not a task; choose one of {', '.join(NAMES)}")
    return importlib.import_module(f"mtnlg.tasks.{MODULES[name]}").TASK


def __getattr__(attr: str):
    if attr == "TASKS":  # every task by name (imports them all)
        return {name: get_task(name) for name in NAMES}
    raise AttributeError(attr)
