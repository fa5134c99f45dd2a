"""Repairing a rejected step (``begin_step`` with a proposal) on tiny real transformers models:
whatever the proposal, the continued step is exactly the model's own greedy step, the cache
equals a fresh forward, and a good proposal saves forwards."""

from __future__ import annotations

import random

import pytest

from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.tasks.grid.puzzles import make_puzzle

PUZZLE = make_puzzle(11)
STOP, CAP = "\n", 24


def greedy_step(target: TransformersBackend) -> tuple[str, list[int]]:
    s = target.open_session(PUZZLE.image, PUZZLE.question.text())
    before = s.length
    out = target.generate_step(s, max_tokens=CAP, stop=STOP)
    ids = s.ids[before:]
    target.close(s)
    return out.text, ids


def variants(ids: list[int], k: int, vocab: int) -> dict[str, list[int]]:
    """Proposals for the rest after ``k`` kept tokens: exact, a substituted, a dropped and an
    inserted token (the shapes of a corrected step), and noise."""
    rest = ids[k:]
    rng = random.Random(k)
    i = len(rest) // 2
    return {
        "exact": rest,
        "substituted": [*rest[:i], (rest[i] + 1) % vocab, *rest[i + 1 :]] if rest else [],
        "dropped": rest[:i] + rest[i + 1 :],
        "inserted": [*rest[:i], rng.randrange(vocab), *rest[i:]],
        "noise": [rng.randrange(vocab) for _ in range(len(rest))],
        "none": [],
    }


@pytest.mark.parametrize("keep", [0, 3, 8])
def test_repair_with_any_proposal_is_the_greedy_step(tiny_pair, keep: int) -> None:  # type: ignore[no-untyped-def]
    target, _ = tiny_pair
    text, ids = greedy_step(target)
    assert len(ids) > keep + 4, "the tiny target should write a step longer than the kept part"
    forwards: dict[str, int] = {}
    for name, proposal in variants(ids, keep, len(target.tokenizer)).items():
        s = target.open_session(PUZZLE.image, PUZZLE.question.text())
        kept = target.begin_step(s, target.decode(ids[:keep]), proposal=target.decode(proposal))
        assert kept == len(target.encode(target.decode(ids[:keep])))
        out = target.generate_step(s, max_tokens=CAP, stop=STOP, budget=3)  # chunked, as the engine calls it
        total = out.forwards
        while not out.done:
            out = target.generate_step(s, max_tokens=CAP, stop=STOP, budget=3)
            total += out.forwards
        assert out.text == text, name
        ref = target.reference_logits(s)[-1]
        assert float((ref - s.logits_at[s.length]).abs().max()) < 1e-4, name
        forwards[name] = total
        target.close(s)
    assert forwards["exact"] <= 2 < forwards["none"], forwards
    assert forwards["substituted"] < forwards["none"], forwards
