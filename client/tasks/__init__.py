"""Tasks: the seam between the generic trainer/server and a concrete model + data kind."""

from client.tasks.base import Encoded, Task, TaskSpec, parse_labels
from client.tasks.registry import TASKS, build_task

__all__ = ["TASKS", "Encoded", "Task", "TaskSpec", "build_task", "parse_labels"]
