"""Task name → class."""

from __future__ import annotations

from client.tasks.base import Task, TaskSpec
from client.tasks.image import ImageClassification
from client.tasks.text import TextClassification

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (TextClassification, ImageClassification)}


def build_task(spec: TaskSpec) -> Task:
    """Return the task named by `spec.task`."""
    try:
        return TASKS[spec.task](spec)
    except KeyError:
        raise ValueError(f"unknown task {spec.task!r}; valid: {sorted(TASKS)}") from None
