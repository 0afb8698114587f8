from .tasks import TASKS, DataError, Task, get_task, register

__all__ = ["TASKS", "DataError", "Task", "get_task", "register"]
