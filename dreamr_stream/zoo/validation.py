"""The zoo trainer's validation: teacher-forced metrics of the model on fixed validation items."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from dreamr_stream.tasks import Task
from dreamr_stream.zoo.data import (
    IGNORE,
    Example,
    collate,
    judge_example,
    judge_item_example,
    solution_example,
    verdict_ids,
    verdict_position,
)
from dreamr_stream.zoo.draft_steps import DraftStep
from dreamr_stream.zoo.heads import AuxHeads

__all__ = ["evaluate", "verdict_accuracy"]


@torch.no_grad()
def verdict_accuracy(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, items: list[tuple[Example, bool]]
) -> float:
    """Share of judge items whose verdict (`` yes`` vs `` no`` after the judge suffix) is right."""
    pos, neg = verdict_ids(processor)
    batch = collate([e for e, _ in items], processor.tokenizer.pad_token_id)
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
    ).logits
    verdict_logits = logits[torch.arange(len(items)), verdict_position(batch.attention_mask)]
    said_yes = verdict_logits[:, pos] > verdict_logits[:, neg]
    truth = torch.tensor([c for _, c in items])
    return float((said_yes == truth).float().mean())


@torch.no_grad()
def evaluate(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    aux: AuxHeads,
    task: Task,
    *,
    size: int,
    judge: bool,
    held_out: Sequence[DraftStep] = (),
    focus: Sequence[str] = (),
) -> dict[str, float]:
    """Teacher-forced metrics on fixed validation items (the first ``size`` of ``task``'s val
    split): token and whole-step accuracy, with ``focus`` the step accuracy of the steps that
    start with one of those prefixes alone, and with ``judge`` the judge accuracy on the judge
    set and on the held-out draft steps."""
    model.eval()
    rng = random.Random(1234)
    tok = processor.tokenizer
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    items = [task.item("val", i) for i in range(size)]
    batch = collate([solution_example(processor, item) for item in items], tok.pad_token_id)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values)
    pred = out.logits[:, :-1].argmax(-1)
    gold = batch.labels[:, 1:]
    ok = (pred == gold) | (gold == IGNORE)
    n_steps = steps_ok = rows = rows_ok = n_focus = focus_ok = 0
    for b in range(gold.shape[0]):
        # a step spans the supervised tokens up to and including its delimiter
        idx = (gold[b] != IGNORE).nonzero().flatten().tolist()
        current: list[int] = []
        k = 0
        for i in idx:
            current.append(i)
            if gold[b, i].item() in (newline, tok.eos_token_id):
                good = bool(ok[b, current].all())
                n_steps += 1
                steps_ok += good
                if k < 4:
                    rows += 1
                    rows_ok += good
                if focus and items[b].steps[k].startswith(tuple(focus)):
                    n_focus += 1
                    focus_ok += good
                current, k = [], k + 1
    tok_acc = float(ok[gold != IGNORE].float().mean())
    aux_acc = (
        float((aux.head(aux.features).argmax(-1) == batch.cells).float().mean()) if aux.features is not None else 0.0
    )
    metrics = {
        "val_tok_acc": tok_acc,
        "val_step_acc": steps_ok / max(1, n_steps),
        "val_row_acc": rows_ok / max(1, rows),
        "val_aux_cell_acc": aux_acc,
    }
    if focus:
        metrics["val_focus_step_acc"] = focus_ok / max(1, n_focus)
    if judge:
        judged = [judge_example(processor, item, rng) for item in items]
        metrics["val_judge_acc"] = verdict_accuracy(model, processor, judged)
        if held_out:
            drafted = [judge_item_example(processor, s.judge_item()) for s in held_out]
            metrics["val_draft_judge_acc"] = verdict_accuracy(model, processor, drafted)
    model.train()
    return metrics
