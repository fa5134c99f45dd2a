"""After which layer does the demo target stop knowing which cell word a step actually wrote?

TBVM's judge mode asks the target, after ``<step>\\nCheck:``, whether the step is one it would have
written. For a misread cell ("red square" where the image shows a red circle) the likelihood
check sees it at once: the written ` square` is improbable. A verdict needs the same comparison
inside the model: the prediction at the token before against the token written. This measures
whether the written token is still readable where that prediction is formed.

For each layer's hidden state at the candidate's cell words (colours and shapes): a linear probe
(softmax regression) of the written word, fit on words the target itself would write (p >= the
likelihood check's threshold, train-split judge items) and scored on the test split at

* words the target would write (``probable``): the probe's accuracy there;
* words it would not (``improbable``: a misread cell of a corrupted step): the share where the
  probe still reads the written word. Where this falls, the layer carries what the image shows
  in place of what was written, and no layer above can compare the two.

Run: ``python benchmarks/written_token_probe.py [--target FOLDER] [--train 600] [--test 600]``;
writes ``benchmarks/results/written_token_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from dreamr_stream.backends.shipped import WEIGHTS
from dreamr_stream.tasks import Split, get_task
from dreamr_stream.zoo.data import IGNORE, judge_item_example
from dreamr_stream.zoo.judge_layers import judge_items, likelihood_threshold
from dreamr_stream.zoo.task_needs import swap_task

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TARGET = WEIGHTS / "target"


@torch.no_grad()
def cell_words(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    split: Split,
    n: int,
    words: list[str],
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states after every layer at the candidates' ``words`` (N, layers + 1, hidden), which
    word each is (N,), and whether the target finds it probable (N,: p >= ``threshold``, the
    likelihood check)."""
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(tok.tokenize(" " + w))[0] for w in words]
    hidden, which, probable = [], [], []
    for item in judge_items(split, n, seed=17, swap_fraction=0.0):
        ex, _ = judge_item_example(processor, item)
        start = next(i for i, f in enumerate(ex.flags or []) if f != IGNORE)
        seq = torch.tensor(ex.input_ids[:-1])[None]
        out = model(input_ids=seq, pixel_values=ex.pixel_values[None], output_hidden_states=True)
        p = torch.softmax(out.logits[0], -1)
        layers = torch.stack(out.hidden_states, 2)[0]  # (T, layers + 1, hidden)
        for i in range(start, seq.shape[1]):
            token = int(seq[0, i])
            if token in ids:
                hidden.append(layers[i])
                which.append(ids.index(token))
                probable.append(bool(p[i - 1, token] >= threshold))
    return torch.stack(hidden), torch.tensor(which), torch.tensor(probable)


def fit(x: torch.Tensor, y: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax regression on standardised features (LBFGS, L2): the weights and the standardisation."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = (x - mean) / std
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ w, y) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), mean, std


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, default=DEFAULT_TARGET)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "written_token_probe.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    processor = LlavaProcessor.from_pretrained(DEFAULT_TARGET)
    model = LlavaForConditionalGeneration.from_pretrained(args.target, dtype=torch.float32).eval()
    report: dict[str, object] = {
        "command": shlex.join(["python", "benchmarks/written_token_probe.py", *argv]),
        "date": date.today().isoformat(),
        "target": "shipped target" if args.target == DEFAULT_TARGET else args.target.name,
    }
    threshold = likelihood_threshold(args.target)  # at the likelihood tau the target recommends
    # the words the grid task (the demo models') names a cell by: what this probe is about
    vocabulary = swap_task(get_task("grid"), needed_by="the written-token probe").words
    for kind in ("shape", "colour"):
        words = list(vocabulary[kind])
        train_x, train_y, train_ok = cell_words(model, processor, "train", args.train, words, threshold)
        test_x, test_y, test_ok = cell_words(model, processor, "test", args.test, words, threshold)
        per_layer = {}
        for layer in range(train_x.shape[1]):
            w, mean, std = fit(train_x[train_ok, layer], train_y[train_ok], len(words))
            read = (((test_x[:, layer] - mean) / std) @ w).argmax(-1) == test_y
            per_layer[str(layer)] = {
                "probable": round(float(read[test_ok].float().mean()), 3),
                "improbable": round(float(read[~test_ok].float().mean()), 3),
            }
        report[kind] = {
            "words": {"probable": int(test_ok.sum()), "improbable": int((~test_ok).sum())},
            "written_word_read_after_layer": per_layer,
        }
    report["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    print(text)
    args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
