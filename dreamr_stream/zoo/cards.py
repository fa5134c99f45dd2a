"""Model cards for the shipped demo models, filled from a training log and an evaluation report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["model_card"]

RECIPE = """\
## Task and recipe (why it looks like this)

Synthetic 4x4 grids of coloured shapes (red, green, blue, yellow x circle, square, triangle) on a
112 px image; one shape per 28 px cell, so each of the 16 visual tokens (28 px patches) sees one
cell. Questions mix perception and arithmetic: count by colour, by shape or both; sides of
squares/triangles; differences; sums. Reference solutions are short steps, each needing little
perception: one step per grid row names its four cells and tallies the question's quantity with
a running total right beside the reading (`Row 2: red circle, empty, ... Red: 1, total 3.`), then
a compute step (`5 x 3 sides = 15.`), then `Answer: N`.

Lessons from two earlier runs that stalled at ~20% (per-row counting from far-away text, shape
washed out of the vision tower) shaped the recipe: running totals next to each row; an auxiliary
per-cell classification loss on the projected visual tokens (keeps colour and shape in them);
the vision tower at 0.3x learning rate and read at its patch-embedding layer; a cosine schedule
with a 15% floor; no concurrent jobs on the two cores. The target additionally learns to judge
(`<step>\\nCheck:` -> ` yes` / ` no`) on correct and corrupted steps (misread cell, wrong count,
wrong running total, wrong arithmetic, wrong answer).
"""


def model_card(
    *,
    name: str,
    role: str,
    folder: Path,
    config: dict[str, Any],
    train_log: Path | None,
    checkpoint_step: int,
    evaluation: dict[str, Any],
    notes: str = "",
) -> str:
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    arch = json.loads((folder / "config.json").read_text())
    text_cfg = arch["text_config"]
    minutes = "?"
    if train_log is not None and train_log.exists():
        rows = [json.loads(x) for x in train_log.read_text().splitlines()]
        secs = sum(r["s_per_step"] * 10 for r in rows if "s_per_step" in r and r["step"] <= checkpoint_step)
        minutes = f"{secs / 60:.0f}"
    shape = config["shape"]
    lines = [
        f"# {name}",
        "",
        f"The demo {role} of dreamr-stream: a LLaVA-architecture VLM (CLIP vision tower, 1 layer x "
        f"{shape['vision_hidden']}, 28 px patches; Llama language model {text_cfg['num_hidden_layers']} layers x "
        f"{text_cfg['hidden_size']}, vocabulary {text_cfg['vocab_size']}), trained from scratch on CPU. "
        f"Weights: {weights / 2**20:.1f} MiB of bf16 safetensors (loaded as fp32 on CPU).",
        "",
        "## Training",
        "",
        f"`dreamr zoo train dreamr_stream/zoo/configs/{config['name']}.json` (seed {config['seed']}); shipped "
        f"checkpoint: step {checkpoint_step} of batch {config['batch_size']}, about {minutes} min on 2 CPU cores. "
        f"Learning rate {config['lr']}, judge items {config.get('judge_fraction', 0):.0%}.",
        "",
        RECIPE,
        "## Measured (held-out test split)",
        "",
        "```json",
        json.dumps(evaluation, indent=2),
        "```",
    ]
    if notes:
        lines += ["", "## Notes", "", notes]
    return "\n".join(lines) + "\n"
