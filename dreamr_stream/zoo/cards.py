"""Model cards for the shipped demo models, filled from their training stages and an evaluation report.

    python -m dreamr_stream.zoo.cards [--models target,draft-sft,draft-sapo] [--check]

writes ``README.md`` in each shipped model's folder from three committed inputs: the card's spec
(``zoo/configs/cards/<model>.json``: name, training stages, which eval file), its notes
(``zoo/configs/cards/<model>.md``) and the eval report under ``benchmarks/results/``, which
``dreamr zoo eval ... --json benchmarks/results/zoo_eval_<model>.json`` writes (the commands are
in ``benchmarks/README.md``). ``--check`` writes nothing and fails when a card differs.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamr_stream.jsonl import read_jsonl

__all__ = ["Stage", "card_from_spec", "model_card", "sapo_notes"]

ZOO = Path(__file__).parent
SPECS = ZOO / "configs" / "cards"
RESULTS = ZOO.parent.parent / "benchmarks" / "results"
MODELS = ("target", "target-judge", "draft-sft", "draft-sapo", "charts-target", "charts-draft-sft")
# what a card keeps of a method's report: wall times belong to the benchmarks, not to a card
_DROPPED = ("mean_wall_s", "wrong")

RECIPE = """\
## Task and recipe (why it looks like this)

Synthetic 4x4 grids of coloured shapes (red, green, blue, yellow x circle, square, triangle) on a
112 px image; one shape per 28 px cell, so each of the 16 visual tokens (28 px patches) sees one
cell. Questions mix perception and arithmetic: count by colour, by shape or both; sides of
squares/triangles; differences; sums. Reference solutions are short steps, each needing little
perception: one step per grid row names its four cells and marks every matching cell in place
with its running count, then states the totals so far
(`Row 2: red circle = red 3, empty, blue square, red square = red 4. Red: 4.`), then a compute
step (`4 x 3 sides = 12.`), then `Answer: N`.

Lessons from two earlier runs that stalled at ~20% (per-row counting from far-away text, shape
washed out of the vision tower) shaped the recipe: an auxiliary per-cell classification loss on
the projected visual tokens (keeps colour and shape in them); the vision tower at 0.3x learning
rate and read at its patch-embedding layer; no concurrent jobs on the two cores. A third lesson
came from the first shipped target (63% final-answer accuracy): it read cells 99.5% right but
wrote 4% of its per-row counts (`Red: 2, total 3.`) wrong, since one token had to count four
cells; marking each matching cell in place makes every decision local, and the count is one
more than the last mark.
"""


@dataclass(frozen=True)
class Stage:
    """One training run of a model's recipe: its config, its log and the step carried on."""

    config: dict[str, Any]
    log: Path | None
    step: int
    known_minutes: float | None = None  # for a stage whose log is gone

    def minutes(self) -> float | None:
        if self.log is None or not self.log.exists():
            return self.known_minutes
        rows = read_jsonl(self.log)
        return sum(r["s_per_step"] * 10 for r in rows if "s_per_step" in r and r["step"] <= self.step) / 60

    def line(self) -> str:
        c = self.config
        minutes = self.minutes()
        cost = f", about {minutes:.0f} min on 2 CPU cores" if minutes is not None else ""
        note = c.get("extra", {}).get("note", "")
        if "new_layers" in c:  # a judge-layers stage (zoo/judge_layers.py)
            command = "judge-layers"
            trained = f"{c['new_layers']} new layers" + (
                f" and the top {c['trainable_top']} trained" if c.get("trainable_top") else ""
            )
        else:
            command, trained = "train", f"judge items {c.get('judge_fraction', 0):.0%}"
        return (
            f"* `dreamr zoo {command} dreamr_stream/zoo/configs/{c['name']}.json --out runs/{c['name']}` "
            f"(seed {c['seed']}, learning rate {c['lr']}, {trained}): "
            f"step {self.step} of batch {c['batch_size']}{cost}." + (f" {note.rstrip('.')}." if note else "")
        )


def model_card(
    *,
    name: str,
    role: str,
    folder: Path,
    stages: list[Stage],
    evaluation: dict[str, Any],
    notes: str = "",
    recipe: str = RECIPE,
) -> str:
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    arch = json.loads((folder / "config.json").read_text())
    text_cfg, vision_cfg = arch["text_config"], arch["vision_config"]
    minutes = [m for m in (st.minutes() for st in stages) if m is not None]
    lines = [
        f"# {name}",
        "",
        f"The demo {role} of dreamr-stream: a LLaVA-architecture VLM (CLIP vision tower, 1 layer x "
        f"{vision_cfg['hidden_size']}, 28 px patches; Llama language model {text_cfg['num_hidden_layers']} layers x "
        f"{text_cfg['hidden_size']}, vocabulary {text_cfg['vocab_size']}), trained from scratch on CPU. "
        f"Weights: {weights / 2**20:.1f} MiB of bf16 safetensors (loaded as fp32 on CPU).",
        "",
        "## Training",
        "",
        (f"{len(stages)} stages, each starting from the previous one's checkpoint" if len(stages) > 1 else "One run")
        + (f", about {sum(minutes):.0f} min in all" if minutes else "")
        + ":",
        "",
        *[st.line() for st in stages],
        "",
        recipe,
        "## Measured (held-out test split)",
        "",
        "```json",
        json.dumps(evaluation, indent=2),
        "```",
    ]
    if notes:
        lines += ["", "## Notes", "", notes]
    return "\n".join(lines) + "\n"


def sapo_notes(run: Path, *, command: str, settings: tuple[str, ...] = ()) -> str:
    """The SAPO part of a draft's card, from its run folder (``config.json`` and ``log.jsonl``):
    the command, updates and CPU minutes, the chosen settings (``settings``: their names;
    default: the recipe's main knobs), and the validation curve (acceptance of the greedy draft
    step at the target's prefixes)."""
    cfg = json.loads((run / "config.json").read_text())
    rows = read_jsonl(run / "log.jsonl")
    updates = [r for r in rows if "reward" in r]
    evals = [r for r in rows if "acceptance" in r]
    minutes = sum(r["s"] for r in updates) / 60
    keys = settings or (
        "groups_per_step",
        "group_size",
        "temperature",
        "lr",
        "kl_beta",
        "distill",
        "inner_epochs",
        "clip_eps",
        "guide",
        "guide_clip",
        "token_mean",
        "focus",
        "pool",
        "anchor",
        "anchor_puzzles",
        "warmup",
        "decay",
        "train_vision",
    )
    chosen = {k: cfg[k] for k in keys if k in cfg}
    curve = ", ".join(f"{r['step']}: {r['acceptance']:.1%}" for r in evals)
    parts = [
        "Rewards: TBVM evidence (the mode the target recommends) + exact agreement with the target's step",
        "- 0.5 x length beyond it; group-normalised advantages; credit stops at the first token the target",
        "rejects; the target's own step joins each group"
        + (" as an off-policy sample, its ratio unclipped" if cfg.get("guide_clip") is False else "")
        + "; vision tower frozen.",
    ]
    if cfg.get("token_mean"):
        parts.append("The loss is one mean over the batch's credited tokens, not a mean per sample.")
    if cfg.get("focus"):
        parts.append(
            f"{cfg['focus']:.0%} of groups are drawn at prefixes where the current draft's greedy step is not the"
            f" target's (one teacher-forced forward per drawn puzzle, out of {cfg.get('pool')} train puzzles)."
        )
    if cfg.get("distill"):
        parts.append("The dense term adds KL(target || draft) per token, up to that first rejected token.")
    if cfg.get("anchor") and cfg.get("anchor_puzzles"):
        parts.append(
            f"Each update also draws {cfg['anchor_puzzles']} train puzzles whose whole target trajectory anchors the"
            f" draft: {cfg['anchor']:g} x its mean negative log-likelihood per token joins the loss (a supervised"
            " term beside the RL one, as in PPO-ptx and SRFT)."
        )
    if cfg.get("decay"):
        parts.append(
            f"The learning rate warms up over {cfg.get('warmup')} updates, then falls on a cosine to 0 at update"
            f" {cfg['decay']}."
        )
    return (
        f"Trained from the SFT draft (`draft-sft`) with SAPO against the shipped target:\n"
        f"`{command}` ({len(updates)} updates, about {minutes:.0f} min of updates on 2 CPU cores; curves in\n"
        f"`benchmarks/results/sapo_curves.png`). Settings: {json.dumps(chosen)}.\n" + "\n".join(parts) + "\n"
        f"Validation acceptance at the target's prefixes ({evals[0]['judged'] if evals else 0} prefixes of "
        f"{cfg.get('eval_prompts')} puzzles), by update: {curve}."
    )


def _evaluation(spec: dict[str, Any], results: Path) -> dict[str, Any]:
    """The card's "Measured" block from the eval report(s) its spec names."""
    report = json.loads((results / spec["eval"]).read_text())
    out: dict[str, Any] = {"command": report["command"], "date": report["date"]}
    if v := report.get("verification"):
        out["verification"] = f"{v['mode']} mode, tau {v['tau']:g} (the target folder's dreamr.json)"
    for key, value in report.items():
        if isinstance(value, dict) and "method" in value:
            out[key] = {k: x for k, x in value.items() if k not in _DROPPED}
    if "tbvm" in report:  # each mode at its tau, on the judge set and on the drafts' real steps
        out["tbvm"] = report["tbvm"]
    if "prefixes" in report:
        out["acceptance_at_the_targets_prefixes"] = report["prefixes"]
    for key, other_file in spec.get("compare", {}).items():
        other = json.loads((results / other_file).read_text())
        out[key] = {
            "command": other["command"],
            "fpsr_acceptance": other["fpsr"]["acceptance"],
            "fpsr_accuracy": other["fpsr"]["accuracy"],
            "acceptance_at_the_targets_prefixes": other["prefixes"],
        }
    if recorded := spec.get("recorded"):
        out["recorded_not_re_measured"] = {"source": spec["recorded_from"], **recorded}
    return out


def card_from_spec(model: str, *, weights: Path | None = None, specs: Path = SPECS, results: Path = RESULTS) -> str:
    """The card of shipped model ``model`` (a folder name under ``zoo/weights``) from its spec,
    notes and eval report."""
    from dreamr_stream.backends.shipped import WEIGHTS

    spec = json.loads((specs / f"{model}.json").read_text())
    stages = [
        Stage(
            config=json.loads((ZOO / "configs" / f"{st['config']}.json").read_text()),
            log=None,
            step=st["step"],
            known_minutes=st.get("minutes"),
        )
        for st in spec["stages"]
    ]
    notes_file = specs / f"{model}.md"
    # a task's recipe, shared by its models' cards (none named: the grid task's, ``RECIPE``)
    recipe = (specs / spec["recipe"]).read_text() if "recipe" in spec else RECIPE
    return model_card(
        name=spec["name"],
        role=spec["role"],
        folder=(weights or WEIGHTS) / model,
        stages=stages,
        evaluation=_evaluation(spec, results),
        notes=notes_file.read_text().strip() if notes_file.exists() else "",
        recipe=recipe,
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    from dreamr_stream.backends.shipped import WEIGHTS

    parser = argparse.ArgumentParser(description="Write the shipped demo models' cards from their eval reports.")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated folders under zoo/weights")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the zoo_eval_*.json reports are")
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="the models' folders (the cards go there)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a card differs")
    args = parser.parse_args(argv)
    stale = []
    for model in [m for m in args.models.split(",") if m]:
        text = card_from_spec(model, weights=args.weights, results=args.results)
        path = args.weights / model / "README.md"
        if path.exists() and path.read_text() == text:
            continue
        stale.append(str(path))
        if not args.check:
            path.write_text(text)
    print(("differ: " if args.check else "written: ") + (", ".join(stale) or "none"))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
