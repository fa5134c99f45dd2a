"""Verified reasoning steps through the openai SDK: a script written for a vLLM server, pointed at
``dreamr serve`` by its base URL (and the server's token as the API key, if it has one).

    dreamr serve                          # in another terminal (add --target-url to put it in front of vLLM)
    python examples/openai_client.py [--base-url http://127.0.0.1:8765/v1] [--api-key TOKEN]

Each verified step arrives as ``delta.reasoning`` (also ``reasoning_content``, the older name),
the answer as ``delta.content``; ``delta.dreamr`` says where each step came from (the draft,
accepted by TBVM with its ratio, or the target) in the WebSocket protocol's terms.
"""

from __future__ import annotations

import argparse
import base64
import os
from pathlib import Path

from openai import OpenAI

HERE = Path(__file__).parent
IMAGE = HERE / "images" / "puzzle-1.png"
QUESTION = (HERE / "images" / "puzzle-1.txt").read_text().strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8765/v1")
    ap.add_argument("--api-key", default=os.environ.get("DREAMR_TOKEN", "none"))
    args = ap.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id  # one per task: "dreamr-grid" for the shipped models
    image_url = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    stream = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        stream=True,
        # dreamr's own options ride in the body: method, tau, verify, lookahead, fallback, cache, drafts
        extra_body={"method": "fpsr"},
    )
    print("Q:", QUESTION)
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        if reasoning := extra.get("reasoning"):
            step = extra["dreamr"]["step"]
            print(f"[{step['source']:6}] {reasoning.strip()}")
        if delta.content:
            print("answer:", delta.content)


if __name__ == "__main__":
    main()
