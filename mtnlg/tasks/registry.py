"""The ``--task`` names and their modules: one line per task."""

from __future__ import annotations

from mtnlg.errors import UserError
from mtnlg.tasks import classify, mnli, multiple_choice, qqp, race, squad
from mtnlg.tasks.common import Task

TASKS: dict[str, Task] = {
    "mnli": mnli.TASK,
    "qqp": qqp.TASK,
    "race": race.TASK,
    "squad": squad.TASK,
    "classify": classify.TASK,
    "multiple-choice": multiple_choice.TASK,
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"--task {name!r} is not a task; choose one of {', '.join(TASKS)}")
    return TASKS[name]
