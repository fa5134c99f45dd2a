"""Stream verified reasoning steps about one of the shipped example images.

python examples/quickstart.py
"""

from __future__ import annotations

from pathlib import Path

import anyio

from dreamr_stream import Reasoner

IMAGE = Path(__file__).parent / "images" / "puzzle-1.png"
QUESTION = (Path(__file__).parent / "images" / "puzzle-1.txt").read_text().strip()


async def main() -> None:
    reasoner = Reasoner.demo()
    print("Q:", QUESTION)
    async for step in reasoner.astream(IMAGE, QUESTION):
        ratio = f" (ratio {step.verdict.ratio:.3g})" if step.verdict else ""
        print(f"[{step.source.value:6}] {step.text}{ratio}")


if __name__ == "__main__":
    anyio.run(main)
