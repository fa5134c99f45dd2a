"""A fingerprint of the demo models' figures: every step, source, answer and count of a few requests.

    python benchmarks/fingerprint.py --puzzles 8 --out new.json          # in each checkout
    python benchmarks/fingerprint.py --compare old.json new.json         # exit 1 on a difference

For a change that must leave behaviour as it was (a refactor): run it on the revision before and
after (``git worktree add`` the old one, and run it there with that tree first on PYTHONPATH)
and compare. Greedy runs are deterministic, so any difference in steps, sources, kept parts,
answers, judged/accepted counts, target tokens, draft forwards or draft tokens is a change of
behaviour; times are left out (machine noise). The target's forwards are left out too: a
speculative fallback may be cancelled a chunk earlier or later depending on timing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

METHODS = ("fpsr", "sequential", "target_only", "draft_only")


def _requests(n: int) -> list[tuple[Any, str]]:
    try:
        from dreamr_stream.tasks import get_task
    except ImportError:  # a revision from before the task seam
        from dreamr_stream.zoo.task import make_puzzle, split_seed  # type: ignore[import-not-found]

        puzzles = [make_puzzle(split_seed("test", i)) for i in range(n)]
        return [(p.image, p.question.text()) for p in puzzles]
    items = [get_task().item("test", i) for i in range(n)]
    return [(item.image, item.question) for item in items]


def fingerprint(n: int) -> list[dict[str, Any]]:
    from dreamr_stream import Reasoner

    reasoner = Reasoner.demo()
    config = reasoner.config.model_copy(update={"cache": reasoner.config.cache.model_copy(update={"enabled": False})})
    out = []
    try:
        for method in METHODS:
            for image, question in _requests(n):
                result = reasoner.invoke(image, question, method=method, config=config)
                s = result.stats
                out.append(
                    {
                        "method": method,
                        "steps": [[st.text, st.source.value, st.kept] for st in result.steps],
                        "answer": result.answer,
                        "judged": s.draft_steps_judged,
                        "accepted": s.draft_steps_accepted,
                        "target_tokens": s.target_tokens,
                        "draft_forwards": s.draft_forwards,
                        "draft_tokens": s.draft_tokens,
                    }
                )
    finally:
        reasoner.close()
    return out


def compare(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[str]:
    if len(old) != len(new):
        return [f"{len(old)} requests against {len(new)}"]
    return [
        f"request {i} ({a['method']}): " + ", ".join(k for k in a if a[k] != b.get(k))
        for i, (a, b) in enumerate(zip(old, new, strict=True))
        if a != b
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--puzzles", type=int, default=8, help="test puzzles per method")
    p.add_argument("--out", type=Path, help="write the fingerprint here")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    args = p.parse_args()
    if args.compare:
        old, new = (json.loads(f.read_text()) for f in args.compare)
        differences = compare(old, new)
        print("\n".join(differences) or f"identical: {len(new)} requests")
        return 1 if differences else 0
    data = fingerprint(args.puzzles)
    text = json.dumps(data, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
