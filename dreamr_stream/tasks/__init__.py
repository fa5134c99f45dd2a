"""Reasoning tasks behind one seam (``Task``), found by name.

>>> task = get_task("grid")
>>> item = task.item("test", 0)
>>> item.question, item.steps[-1]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from dreamr_stream.errors import ConfigError
from dreamr_stream.tasks.base import SPLITS, JudgeItem, Split, Task, TaskItem

__all__ = [
    "DEFAULT_TASK",
    "SPLITS",
    "JudgeItem",
    "Split",
    "Task",
    "TaskItem",
    "TaskLike",
    "as_task",
    "get_task",
    "items",
    "register_task",
    "task_names",
]

# what a function that works on any task takes: the task itself, or its name
TaskLike = Task | str

DEFAULT_TASK = "grid"


def _grid() -> Task:
    from dreamr_stream.tasks.grid import GridTask

    return GridTask()


def _charts() -> Task:
    from dreamr_stream.tasks.charts import ChartsTask

    return ChartsTask()


# name -> factory; a task module is imported only when asked for
_FACTORIES: dict[str, Callable[[], Task]] = {"charts": _charts, "grid": _grid}
_LOADED: dict[str, Task] = {}


def register_task(task: Task | Callable[[], Task], name: str | None = None) -> None:
    """Make a task available by name (``get_task``, ``--task``, the demo page's picker)."""
    if isinstance(task, Task):
        _LOADED[task.name] = task
        _FACTORIES[task.name] = lambda: task
        return
    if name is None:
        raise ConfigError("register_task(factory) needs the task's name")
    _FACTORIES[name] = task
    _LOADED.pop(name, None)


def task_names() -> list[str]:
    return sorted(_FACTORIES)


def get_task(name: str = DEFAULT_TASK) -> Task:
    """The task called ``name``; ConfigError naming the known ones otherwise."""
    if name not in _LOADED:
        factory = _FACTORIES.get(name)
        if factory is None:
            raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
        _LOADED[name] = factory()
    return _LOADED[name]


def as_task(task: TaskLike = DEFAULT_TASK) -> Task:
    """``task`` itself, or the registered task of that name (``get_task``)."""
    return get_task(task) if isinstance(task, str) else task


def items(task: TaskLike, split: Split, n: int, start: int = 0) -> Iterator[TaskItem]:
    """Items ``start .. start + n - 1`` of ``split``, in order, each made when it is reached."""
    chosen = as_task(task)
    return (chosen.item(split, i) for i in range(start, start + n))
