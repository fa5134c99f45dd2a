"""Every engine event of one request: drafts, verdicts, rejections, fallbacks, stats.

python examples/events.py
"""

from __future__ import annotations

import anyio

from dreamr_stream import Reasoner
from dreamr_stream.tasks import get_task


async def main() -> None:
    reasoner = Reasoner.demo()
    puzzle = get_task("grid").item("test", 42)
    async for event in reasoner.astream_events(puzzle.image, puzzle.question):
        if event.type == "finished":
            stats = event.result.stats
            print(f"answer {event.result.answer} (truth {puzzle.answer}); acceptance {stats.acceptance_rate}")
        else:
            print(event.model_dump_json(exclude={"result"}))


if __name__ == "__main__":
    anyio.run(main)
