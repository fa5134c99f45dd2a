"""Does the demo target know whether a step is right, even where its yes/no verdict does not say it?

For judge items (``Task.judge_item``: the reference step or a corrupted one, after a
correct prefix, then ``\\nCheck:``) this reads, at the position that predicts the verdict token:

* the verdict itself: accuracy of ``p(" yes") > p(" no")`` and the AUROC of ``p_yes / p_no``;
* a linear probe (logistic regression, fit on train-split items, scored on test-split items) on
  the language model's hidden state after every layer: if the probe separates correct from
  corrupted steps, the knowledge is in the model and only the verdict head is missing;
* the same probe at the candidate's last token (before the judge suffix), to tell "knows after
  reading the step" from "knows only once asked";
* the logit lens on reference solutions: after which layer the next token can be read off the
  hidden state (final norm + LM head), for all tokens and for numbers. A verdict after the step
  can use a token's check only if the model predicted that token early enough for later layers
  to compare and carry the result forward.

Run: ``python benchmarks/judge_probe.py [--target FOLDER] [--train 600] [--test 300]``; writes
``benchmarks/results/judge_probe[-<name>].json``.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from dreamr_stream.tasks import Split, get_task
from dreamr_stream.zoo.data import IGNORE, collate, judge_example, solution_example, verdict_ids, verdict_position
from dreamr_stream.zoo.tbvm_eval import auroc

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TARGET = ROOT / "dreamr_stream" / "zoo" / "weights" / "target"
GRID = get_task("grid")  # the demo models' task


@torch.no_grad()
def features(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, split: Split, n: int, seed: int
) -> dict[str, torch.Tensor]:
    """Hidden states at the verdict and candidate-end positions, verdict log-odds, labels."""
    tok = processor.tokenizer
    yes, no = verdict_ids(processor)
    suffix_len = 2  # "\n" + "Check:" (one token each in the demo tokenizer) before the verdict
    rng = random.Random(seed)
    verdict, cand_end, odds, labels = [], [], [], []
    for start in range(0, n, 32):
        items = [judge_example(processor, GRID.item(split, 20_000 + i), rng) for i in range(start, min(n, start + 32))]
        batch = collate([e for e, _ in items], tok.pad_token_id)
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            output_hidden_states=True,
        )
        rows = torch.arange(len(items))
        at = verdict_position(batch.attention_mask)
        hidden = torch.stack(out.hidden_states, 1)  # (B, layers + 1, T, H)
        verdict.append(hidden[rows, :, at])
        cand_end.append(hidden[rows, :, at - suffix_len])
        logits = out.logits[rows, at].log_softmax(-1)
        odds.append(logits[:, yes] - logits[:, no])
        labels.append(torch.tensor([c for _, c in items]))
    return {
        "verdict": torch.cat(verdict),
        "cand_end": torch.cat(cand_end),
        "odds": torch.cat(odds),
        "labels": torch.cat(labels),
    }


@torch.no_grad()
def logit_lens(model: LlavaForConditionalGeneration, processor: LlavaProcessor, n: int) -> dict[str, dict[str, float]]:
    """Per layer: the share of reference-solution tokens that layer's hidden state predicts (top 1)."""
    tok = processor.tokenizer
    examples = [solution_example(processor, GRID.item("val", i)) for i in range(n)]
    batch = collate(examples, tok.pad_token_id)
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        output_hidden_states=True,
    )
    gold = batch.labels[:, 1:]
    supervised = gold != IGNORE
    is_number = torch.tensor([tok.decode([t]).strip().isdigit() for t in range(model.lm_head.weight.shape[0])])
    numbers = supervised & is_number[gold.clamp(min=0)]
    norm = model.model.language_model.norm
    report = {}
    for layer, hidden in enumerate(out.hidden_states):
        right = model.lm_head(norm(hidden))[:, :-1].argmax(-1) == gold
        report[str(layer)] = {
            "tokens": round(float(right[supervised].float().mean()), 3),
            "numbers": round(float(right[numbers].float().mean()), 3),
        }
    return report


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> dict:
    """L2-regularised logistic regression (LBFGS) on standardised features: test accuracy, AUROC."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xa, xb = (train_x - mean) / std, (test_x - mean) / std
    w = torch.zeros(xa.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")
    target = train_y.float()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xa @ w + b, target) + 1e-2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        train_acc = float(((xa @ w + b > 0) == train_y).float().mean())
        scores = xb @ w + b
        return {
            "train_accuracy": round(train_acc, 3),
            "test_accuracy": round(float(((scores > 0) == test_y).float().mean()), 3),
            "test_auroc": round(auroc(scores, test_y), 3),
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, default=DEFAULT_TARGET)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    # a training checkpoint has no processor of its own: the shipped target's is the one it was trained with
    has_processor = (args.target / "processor_config.json").exists()
    processor = LlavaProcessor.from_pretrained(args.target if has_processor else DEFAULT_TARGET)
    model = LlavaForConditionalGeneration.from_pretrained(args.target, dtype=torch.float32).eval()
    train = features(model, processor, "train", args.train, seed=1)
    test = features(model, processor, "test", args.test, seed=2)
    y = test["labels"]
    said_yes = test["odds"] > 0
    report: dict[str, object] = {
        "command": shlex.join(["python", "benchmarks/judge_probe.py", *argv]),
        "date": date.today().isoformat(),
        "target": args.target.name if args.target != DEFAULT_TARGET else "shipped target",
        "items": {"train": args.train, "test": args.test, "test_correct_share": round(float(y.float().mean()), 3)},
        "verdict": {
            "accuracy": round(float((said_yes == y).float().mean()), 3),
            "says_yes": round(float(said_yes.float().mean()), 3),
            "auroc": round(auroc(test["odds"], y), 3),
        },
        "probe_at_verdict": {},
        "probe_at_candidate_end": {},
    }
    for where in ("verdict", "cand_end"):
        key = "probe_at_verdict" if where == "verdict" else "probe_at_candidate_end"
        for layer in range(train[where].shape[1]):
            report[key][str(layer)] = probe(  # type: ignore[index]
                train[where][:, layer], train["labels"], test[where][:, layer], y
            )
    report["logit_lens"] = logit_lens(model, processor, 48)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    print(text)
    suffix = "" if args.target == DEFAULT_TARGET else f"-{args.target.name}"
    out = args.json or ROOT / "benchmarks" / "results" / f"judge_probe{suffix}.json"
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
