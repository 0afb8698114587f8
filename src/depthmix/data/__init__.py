"""Datasets, formatting and tokenisation of the tasks; importing this package registers every task."""
from .tasks import TASKS, DataError, Task, get_task, register, task_names
from . import glue, pydoc_topics, text, instruct  # noqa: F401,E402  (each registers its tasks on import)

__all__ = ["TASKS", "DataError", "Task", "get_task", "register", "task_names"]
