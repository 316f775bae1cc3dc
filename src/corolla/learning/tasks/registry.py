"""Task name → class, resolved from the one catalogue of tasks in `corolla.spec.TASKS`."""

from __future__ import annotations

import importlib

from corolla.learning.tasks.base import Task
from corolla.spec import TASKS, TaskSpec


def task_class(name: str) -> type[Task]:
    """Import the class of task `name`."""
    try:
        info = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid: {sorted(TASKS)}") from None
    module, attr = info.target.split(":")
    return getattr(importlib.import_module(module), attr)


def build_task(spec: TaskSpec) -> Task:
    """Return the task named by `spec.task`."""
    return task_class(spec.task)(spec)
