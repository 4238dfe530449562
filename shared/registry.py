"""The task registry: name -> Task instance.

Every module in ``fedcare.shared.tasks`` is imported on first use, so adding a task is
adding one module with one ``@register`` class; nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil

from .errors import ConfigError
from .tasks.base import Task

_TASKS: dict[str, Task] = {}
_discovered = False


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: instantiate and register a task under ``cls.name``."""
    if cls.name in _TASKS and type(_TASKS[cls.name]) is not cls:
        raise RuntimeError(f"task name '{cls.name}' registered twice")
    _TASKS[cls.name] = cls()
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    from . import tasks

    for info in pkgutil.iter_modules(tasks.__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{tasks.__name__}.{info.name}")
    _discovered = True


def get_task(name: str) -> Task:
    _discover()
    try:
        return _TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task '{name}'; registered: {', '.join(sorted(_TASKS))}") from None


def task_names() -> list[str]:
    _discover()
    return sorted(_TASKS)
