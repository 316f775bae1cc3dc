"""Tasks: the seam between the generic trainer/server and a concrete model + data kind."""

from corolla.learning.tasks.base import Encoded, Task
from corolla.learning.tasks.registry import build_task
from corolla.spec import TaskSpec, parse_labels

__all__ = ["Encoded", "Task", "TaskSpec", "build_task", "parse_labels"]
