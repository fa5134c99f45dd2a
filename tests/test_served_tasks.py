"""One server, several tasks: a request names its task (``task`` on ``/ws``, ``model`` on ``/v1``)
or gets the first; ``/tasks`` lists them; ``/puzzle?task=`` is that task's own item; every task
shares one admission; ``dreamr serve`` serves every shipped task unless ``--task`` narrows it.

Each task's Reasoner runs over scripted fakes whose answers differ ("4" for the grid, "58" for
the charts), so an answer says which Reasoner gave it. The puzzles are the real tasks' items.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from dreamr_websocket.protocol import ServerStats, parse_client_message
from dreamr_websocket.routes import DemoPuzzle, ServedTasksInfo
from dreamr_websocket.served import ServedTasks
from ws_support import ask, client, http_get, make_reasoner, png_b64, serving, until_terminal, wait_until

from dreamr_app import serve as serve_command
from dreamr_app.cli import build_parser
from dreamr_app.common import UsageError
from dreamr_stream.errors import ConfigError
from dreamr_stream.inputs import load_image
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.tasks import get_task

CHART_STEPS = ["Bar C: 58", "Answer: 58"]
IMAGE = f"data:image/png;base64,{png_b64()}"


def two_tasks(*, delay: float = 0.0) -> dict[str, Reasoner]:
    """The grid first (the default), then the charts; each its own scripted Reasoner."""
    return {"grid": make_reasoner(delay=delay), "charts": make_reasoner(target=CHART_STEPS, draft=CHART_STEPS)}


def answer_of(messages: list[dict[str, Any]]) -> str | None:
    return next((m["answer"] for m in messages if m["type"] == "answer"), None)


def chat(model: str | None = None) -> dict[str, Any]:
    content = [
        {"type": "text", "text": "What is the value of bar C?"},
        {"type": "image_url", "image_url": {"url": IMAGE}},
    ]
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}]}
    return body if model is None else {**body, "model": model}


# ---------------------------------------------------------------------------------- /ws
@pytest.mark.asyncio
async def test_a_request_without_a_task_gets_the_default_and_task_picks_the_reasoner() -> None:
    async with serving(two_tasks()) as server, client(server) as ws:
        await ws.send(ask(id="old-client"))  # a v1 client that never heard of tasks
        assert answer_of(await until_terminal(ws)) == "4"
        await ws.send(ask(id="chart", task="charts"))
        messages = await until_terminal(ws)
        assert answer_of(messages) == "58" and all(m["id"] == "chart" for m in messages)
        await ws.send(ask(id="grid", task="grid"))
        assert answer_of(await until_terminal(ws)) == "4"
        _, _, body = await http_get(server, "/stats")
    stats = ServerStats.model_validate_json(body)
    assert list(stats.tasks) == ["grid", "charts"]
    assert [t.requests for t in stats.tasks.values()] == [2, 1]
    assert [t.model for t in stats.tasks.values()] == ["dreamr-grid", "dreamr-charts"]
    # the top-level fields are still there, and are the default task's
    assert stats.totals["completed"] == 3 and stats.engine_requests == stats.tasks["grid"].engine_requests == 0


@pytest.mark.asyncio
async def test_a_task_not_served_is_refused_as_a_bad_option_naming_the_served_ones() -> None:
    async with serving(two_tasks()) as server, client(server) as ws:
        await ws.send(ask(id="q1", task="poetry"))
        [error] = await until_terminal(ws)
        assert error["type"] == "error" and error["id"] == "q1" and error["code"] == "invalid_option"
        assert "grid, charts" in error["message"] and "poetry" not in error["message"]  # input is never echoed
        await ws.send(ask(id="q2", task="charts"))  # the connection stays open and serves
        assert answer_of(await until_terminal(ws)) == "58"
        assert server.totals["rejected_input"] == 1 and [t.requests for t in server.tasks] == [0, 1]


def test_a_task_that_is_not_a_plain_name_is_a_bad_request() -> None:
    for task in ("a b", "x" * 65, "", 7):
        error = parse_client_message(ask(task=task))
        assert getattr(error, "code", None) == "bad_request", task
    assert parse_client_message(ask(task="charts")).task == "charts"  # type: ignore[union-attr]
    assert parse_client_message(ask()).task is None  # type: ignore[union-attr]
    # nor may a server serve a task under a name no request could send, or serve none
    with pytest.raises(ConfigError, match="1 to 64"):
        ServedTasks({"bar charts": make_reasoner()})
    with pytest.raises(ConfigError, match="at least one"):
        ServedTasks({})


@pytest.mark.asyncio
async def test_every_task_shares_one_admission() -> None:
    async with serving(two_tasks(delay=0.05), max_active=1, max_waiting=0) as server:
        async with client(server) as first, client(server) as second:
            await first.send(ask(id="slow"))  # the grid's, holding the only slot
            await wait_until(lambda: server.admission.active == 1, what="the first request runs")
            await second.send(ask(id="other", task="charts"))
            [busy] = await until_terminal(second)
            assert busy["code"] == "busy" and busy["retryable"]
            assert answer_of(await until_terminal(first)) == "4"


# ---------------------------------------------------------------------------------- /v1
@pytest.mark.asyncio
async def test_models_lists_every_task_and_the_model_picks_the_reasoner() -> None:
    async with serving(two_tasks()) as server, httpx.AsyncClient(base_url=server.api_url + "/", timeout=10) as api:
        listing = (await api.get("models")).json()
        assert [m["id"] for m in listing["data"]] == ["dreamr-grid", "dreamr-charts"]
        for model, answer in (("dreamr-charts", "58"), ("dreamr-grid", "4"), (None, "4")):
            response = await api.post("chat/completions", json=chat(model))
            completion = response.json()
            assert response.status_code == 200, completion
            assert completion["model"] == (model or "dreamr-grid")
            assert completion["choices"][0]["message"]["content"] == answer, model
        unknown = await api.post("chat/completions", json=chat("dreamr-poetry"))
        error = unknown.json()["error"]
        assert unknown.status_code == 404 and error["code"] == "model_not_found" and error["param"] == "model"
        assert "dreamr-grid, dreamr-charts" in error["message"]
    assert [t.requests for t in server.tasks] == [2, 1]


# ---------------------------------------------------------------------------------- /tasks and /puzzle
@pytest.mark.asyncio
async def test_tasks_route_and_each_task_s_own_puzzle() -> None:
    async with serving(two_tasks()) as server:
        status, _, body = await http_get(server, "/tasks")
        served = ServedTasksInfo.model_validate_json(body)
        assert status == 200 and served.default == "grid"
        assert [(t.name, t.title, t.model) for t in served.tasks] == [
            ("grid", get_task("grid").title, "dreamr-grid"),
            ("charts", get_task("charts").title, "dreamr-charts"),
        ]
        _, _, body = await http_get(server, "/puzzle?seed=5")
        grid = DemoPuzzle.model_validate_json(body)
        assert grid.task == "grid" and load_image(grid.image).size == (112, 112)
        status, _, body = await http_get(server, "/puzzle?task=charts&seed=3")
        chart = DemoPuzzle.model_validate_json(body)
        item = get_task("charts").item("test", 3)
        assert status == 200 and (chart.task, chart.title) == ("charts", get_task("charts").title)
        assert (chart.question, chart.answer) == (item.question, str(item.answer))
        assert load_image(chart.image).size == item.image.size == (224, 224)
        status, _, body = await http_get(server, "/puzzle?task=poetry")
        assert status == 400 and b"grid, charts" in body


@pytest.mark.asyncio
async def test_one_reasoner_serves_as_it_always_did() -> None:
    reasoner = make_reasoner()  # scripted: its target names no task
    async with serving(reasoner) as server, client(server) as ws:
        assert server.model_ids() == ["dreamr-reasoner"] and server.reasoner is reasoner
        await ws.send(ask())
        assert answer_of(await until_terminal(ws)) == "4"
        _, _, body = await http_get(server, "/tasks")
        assert ServedTasksInfo.model_validate_json(body).default == "grid"  # its puzzles are the default task's
        assert (await http_get(server, "/puzzle?task=charts"))[0] == 400  # a task nobody here answers
        _, _, body = await http_get(server, "/stats")
        assert list(ServerStats.model_validate_json(body).tasks) == ["grid"]


# ---------------------------------------------------------------------------------- dreamr serve
def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


@pytest.fixture
def two_shipped(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As it will be once the chart models ship: two tasks with shipped models."""
    monkeypatch.setattr("dreamr_stream.backends.shipped.shipped_tasks", lambda: ["grid", "charts"])
    yield


@pytest.mark.usefixtures("two_shipped")
def test_serve_serves_every_shipped_task_unless_task_narrows_it() -> None:
    assert serve_command.served_task_names(serve_args()) == ["grid", "charts"]
    assert serve_command.served_task_names(serve_args("--task", "charts")) == ["charts"]
    assert serve_command.served_task_names(serve_args("--task", "charts", "--task", "grid", "--task", "charts")) == [
        "charts",
        "grid",
    ]
    # model flags: one Reasoner, as before; --task names its task
    assert serve_command.served_task_names(serve_args("--target", "m")) is None
    assert serve_command.served_task_names(serve_args("--target", "m", "--task", "charts")) == ["charts"]
    with pytest.raises(UsageError, match="--task once"):
        serve_command.served_task_names(serve_args("--target", "m", "--task", "grid", "--task", "charts"))
    with pytest.raises(SystemExit):
        serve_args("--task", "poetry")  # argparse names the known tasks


@pytest.mark.usefixtures("two_shipped")
def test_serve_loads_one_configured_reasoner_per_task(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def load(args: argparse.Namespace) -> Reasoner:
        asked.append(args.task)
        if args.task == "broken":
            raise UsageError("no models for it")
        return make_reasoner()

    monkeypatch.setattr(serve_command, "load_reasoner", load)
    loaded = serve_command.load_reasoners(serve_args("--tau", "2.5", "--max-steps", "7"))
    assert isinstance(loaded, dict) and list(loaded) == asked == ["grid", "charts"]
    assert all(r.config.verification.tau == 2.5 and r.config.generation.max_steps == 7 for r in loaded.values())

    # one that fails to load: the ones loaded before it are closed, not left running
    monkeypatch.setattr("dreamr_stream.backends.shipped.shipped_tasks", lambda: ["grid", "broken"])
    closed: list[bool] = []
    monkeypatch.setattr(Reasoner, "close", lambda self: closed.append(True))
    with pytest.raises(UsageError):
        serve_command.load_reasoners(serve_args())
    assert closed == [True]
