"""How sharp is a judge stage's per-token error flag, and does its minimum over a step judge it?

A judge stage with ``flag_labels: own_choice`` trains a flag at every candidate token: is this
token the model's own greedy choice there (the likelihood mode's check, one token at a time).
For a run's checkpoint (``<run>/checkpoint/state.pt``: the model and the flag head) and held-out
judge items (the draft-step pool's held-out puzzles and val-split judge-set items), this reports:

* the flag's AUROC over candidate tokens (own choice vs not), and its mean on each kind;
* the step verdict that the flags' minimum gives (every token flagged above a threshold), against
  the items' labels, beside the same minimum of the exact own-choice labels;
* the model's own verdict (``p(" yes") > p(" no")``) on the same items.

Run: ``python benchmarks/judge_flag.py runs/target-judge [--items 64] [--processor FOLDER]`` (the run's config.json
names the draft-step pool and the flag's layer); prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from dreamr_stream.backends.shipped import WEIGHTS
from dreamr_stream.tasks import get_task
from dreamr_stream.training import load_checkpoint
from dreamr_stream.zoo.build import JUDGE_SUFFIX, grow_decoder
from dreamr_stream.zoo.data import (
    IGNORE,
    collate,
    judge_example,
    judge_item_example,
    verdict_ids,
    verdict_position,
)
from dreamr_stream.zoo.tbvm_eval import auroc
from dreamr_stream.zoo.train import TrainConfig, draft_pool, own_choice_flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--items", type=int, default=64, help="items of each kind")
    parser.add_argument(
        "--processor", type=Path, default=WEIGHTS / "target", help="the run's --processor (the demo models share one)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = TrainConfig.from_json(args.run / "config.json")
    if cfg.flag_layer is None or cfg.init_from is None or cfg.draft_steps is None:
        parser.error(f"{args.run}: not a judge stage with a flag, a start model and a draft-step pool")
    processor = LlavaProcessor.from_pretrained(args.processor)
    model = LlavaForConditionalGeneration.from_pretrained(cfg.init_from, dtype=torch.float32)
    grow_decoder(model, cfg.shape.layers, cfg.seed)
    state = load_checkpoint(args.run / "checkpoint" / "state.pt")
    model.load_state_dict(state["model"])
    model.eval()
    w, b = state["aux"]["flag_head.weight"], state["aux"]["flag_head.bias"]

    _, held_out = draft_pool(cfg.draft_steps)
    rng = random.Random(0)
    items = [judge_item_example(processor, s.judge_item()) for s in held_out[: args.items]]
    grid = get_task("grid")  # the demo models' task
    items += [judge_example(processor, grid.item("val", i), rng) for i in range(args.items)]
    batch = collate([e for e, _ in items], processor.tokenizer.pad_token_id)
    truth = torch.tensor([c for _, c in items])
    tok = processor.tokenizer
    suffix = len(tok(JUDGE_SUFFIX, add_special_tokens=False)["input_ids"])
    pos_id, neg_id = verdict_ids(processor)
    with torch.no_grad():
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            output_hidden_states=True,
        )
        flag = torch.sigmoid(out.hidden_states[cfg.flag_layer + 1] @ w.T + b).squeeze(-1)  # (B, T)
        own = own_choice_flags(out.logits, batch)  # IGNORE outside the judge items' flagged tokens
        # the candidate's tokens: where a judge item's flags are supervised, less the judge suffix
        cand = torch.zeros_like(batch.flags, dtype=torch.bool)
        for r in range(len(items)):
            cand[r, (batch.flags[r] != IGNORE).nonzero().flatten()[:-suffix]] = True
        positive = own[cand] == 1
        report: dict[str, object] = {
            "checkpoint_step": int(state["step"]),
            "candidate_tokens": int(cand.sum()),
            "not_own_choice": round(float((~positive).float().mean()), 3),
            "flag_auroc": round(auroc(flag[cand], positive), 3),
            "flag_mean_on_own_choice": round(float(flag[cand][positive].mean()), 3),
            "flag_mean_elsewhere": round(float(flag[cand][~positive].mean()), 3),
        }

        def agreement(said: torch.Tensor) -> dict[str, float]:
            n = args.items
            return {
                "drafts_steps": round(float((said[:n] == truth[:n]).float().mean()), 3),
                "judge_set": round(float((said[n:] == truth[n:]).float().mean()), 3),
            }

        for threshold in (0.3, 0.5, 0.7):
            said = torch.tensor([bool((flag[r][cand[r]] > threshold).all()) for r in range(len(items))])
            report[f"flag_min_verdict_at_{threshold}"] = agreement(said)
        report["own_choice_labels_min_verdict"] = agreement(
            torch.tensor([bool((own[r][cand[r]] == 1).all()) for r in range(len(items))])
        )
        verdict = out.logits[torch.arange(len(items)), verdict_position(batch.attention_mask)]
        report["verdict"] = agreement(verdict[:, pos_id] > verdict[:, neg_id])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
