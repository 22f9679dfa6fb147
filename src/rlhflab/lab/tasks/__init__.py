"""The built-in lab tasks, by name.

`TASKS` is the one explicit registry; `get_task(name)` returns a task object (see `LabTask` for what it
offers). The default task of `rlhflab run` is "sentiment", the one built to show reward hacking.
"""

from __future__ import annotations

from rlhflab.errors import UserError
from rlhflab.lab.tasks.arith import ArithTask
from rlhflab.lab.tasks.base import LabTask, PretrainSpec, chat_prompt, prompt_text
from rlhflab.lab.tasks.harm import HarmTask
from rlhflab.lab.tasks.review import ReviewTask
from rlhflab.lab.tasks.sentiment import SentimentTask

TASKS: dict[str, type[LabTask]] = {
    "sentiment": SentimentTask,
    "arith": ArithTask,
    "harm": HarmTask,
    "review": ReviewTask,
}
DEFAULT_TASK = "sentiment"


def get_task(name: str | LabTask) -> LabTask:
    """The task called `name` (a task object passes through). Raises `UserError` naming the known tasks."""
    if isinstance(name, LabTask):
        return name
    try:
        return TASKS[name]()
    except KeyError:
        raise UserError(
            f"unknown lab task {name!r}; known tasks: {', '.join(TASKS)} (see `rlhflab lab list`)"
        ) from None


__all__ = ["TASKS", "DEFAULT_TASK", "LabTask", "PretrainSpec", "chat_prompt", "get_task", "prompt_text"]
