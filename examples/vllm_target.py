"""FPSR with the target served by vLLM: verified steps stream in while the server batches.

python examples/vllm_target.py [URL]

URL is a running vLLM server of the shipped demo target (``python -m dreamr_vllm --cpus 0``
starts one on http://127.0.0.1:8000/v1, building its venv the first time). Without a server,
this script starts one itself (about 2 minutes on a small CPU) and stops it at the end.
Two puzzles run at once: each yields its steps as they are verified, and the stats say
how many steps were repaired and whether the load-aware switch left a request to the target.

The server does not say which judge template and TBVM threshold suit its model, so the target
folder's ``dreamr.json`` is passed with ``settings_from`` (without it the Reasoner warns and
verifies on uncalibrated defaults). For a served model without a folder, measure them first:
``dreamr calibrate --target-url URL --draft DRAFT --out SETTINGS``, then ``settings_from=SETTINGS``.
"""

from __future__ import annotations

import contextlib
import sys

import anyio
from dreamr_vllm import VLLMServer, ensure_venv

from dreamr_stream import Reasoner
from dreamr_stream.backends.shipped import demo_paths
from dreamr_stream.tasks import TaskItem, get_task


async def solve(reasoner: Reasoner, name: str, puzzle: TaskItem) -> None:
    async for step in reasoner.astream(puzzle.image, puzzle.question):
        print(f"[{name}] {step.index} {step.source.value:6} {step.text}")
    result = await reasoner.ainvoke(puzzle.image, puzzle.question)  # cached now: instant
    st = result.stats
    print(
        f"[{name}] answer {result.answer} (truth {puzzle.answer}); repaired {st.steps_repaired}, "
        f"target alone from {st.target_alone_from} ({st.target_alone_reason})"
    )


async def main(url: str) -> None:
    shipped = demo_paths()
    reasoner = Reasoner.from_pretrained(
        target=url,  # the shipped target, served
        draft=shipped.draft,  # computes here
        settings_from=shipped.target,  # the served model's judge template and measured tau
    )
    grid = get_task("grid")  # the demo models' task
    async with anyio.create_task_group() as tg:
        for i in range(2):  # a third at once would pass max_speculating (2): the target alone
            tg.start_soon(solve, reasoner, f"q{i}", grid.item("test", 100 + i))


if __name__ == "__main__":
    with contextlib.ExitStack() as stack:
        if len(sys.argv) > 1:
            target_url = sys.argv[1]
        else:
            print("starting a local vLLM server for the demo target (about 2 minutes) ...")
            server = stack.enter_context(VLLMServer(ensure_venv(".venv-vllm"), demo_paths().target, cpus=[0]))
            target_url = server.url
        anyio.run(main, target_url)
