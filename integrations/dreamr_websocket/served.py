"""The tasks one server serves: each task's name, its ``Reasoner`` and its OpenAI model id, in
order (the first is the default).

Why a table of its own: the page (``/puzzle``, ``/tasks``), the WebSocket (a request's ``task``)
and the OpenAI API (a completion's ``model``) each pick a Reasoner by what the client names, and
all three must agree on the names, the model ids and the default. The sessions and the API see
this table, never the server; the server keeps one admission, one rate and one table of
connections for all of it (the tasks' models share the machine).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dreamr_stream.errors import ConfigError
from dreamr_stream.tasks import DEFAULT_TASK, get_task
from dreamr_websocket.protocol import NAME_PATTERN

if TYPE_CHECKING:
    from dreamr_stream.reasoner import Reasoner

__all__ = ["ServedTask", "ServedTasks", "model_id"]


def model_id(task: str) -> str:
    """The OpenAI model id of ``task``'s reasoner: ``dreamr-grid``."""
    return f"dreamr-{task}"


@dataclass
class ServedTask:
    """One served task: what a client names it by, and the Reasoner that answers it."""

    name: str  # the task's name (``dreamr_stream.tasks``): a request's ``task``, ``/puzzle?task=``
    reasoner: Reasoner
    model: str  # the OpenAI model id
    requests: int = 0  # requests routed to it since the server started (``/stats``)

    @property
    def title(self) -> str:
        """The task's one-line title (``Task.title``) for the page; its name when no task of that
        name is registered (a model trained on a task this process does not know)."""
        try:
            return get_task(self.name).title
        except ConfigError:
            return self.name


class ServedTasks:
    """The served tasks, the default first; built from one Reasoner or a mapping name -> Reasoner.

    One Reasoner serves as it always did: its model id names the task its target was trained on
    (``dreamr-reasoner`` when that is unknown), and a request without a task, or a demo puzzle,
    is the default task's.
    """

    def __init__(self, reasoners: Reasoner | Mapping[str, Reasoner]) -> None:
        if isinstance(reasoners, Mapping):
            if not reasoners:
                raise ConfigError("a server serves at least one task")
            for name in reasoners:
                if not NAME_PATTERN.fullmatch(name):  # a name no request could send
                    raise ConfigError(f"task {name!r}: a served task's name is 1 to 64 of A-Z a-z 0-9 _ . : -")
            self._tasks = [ServedTask(name, r, model_id(name)) for name, r in reasoners.items()]
        else:
            known = reasoners.task
            self._tasks = [ServedTask(known or DEFAULT_TASK, reasoners, model_id(known or "reasoner"))]

    def __iter__(self) -> Iterator[ServedTask]:
        return iter(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def default(self) -> ServedTask:
        return self._tasks[0]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._tasks]

    @property
    def model_ids(self) -> list[str]:
        return [t.model for t in self._tasks]

    def task(self, name: str | None) -> ServedTask:
        """The task called ``name`` (None: the default); ``ConfigError`` naming the served ones.

        The message does not repeat the name asked for: what a client sent is never echoed."""
        if name is None:
            return self.default
        for served in self._tasks:
            if served.name == name:
                return served
        raise ConfigError(f"task: not served here; this server serves {self._listed()}")

    def by_model(self, model: str | None) -> ServedTask | None:
        """The task whose model id is ``model`` (None: the default); None when there is none."""
        if model is None:
            return self.default
        return next((t for t in self._tasks if t.model == model), None)

    def _listed(self) -> str:
        return ", ".join(self.names) + f" (default: {self.default.name})"
