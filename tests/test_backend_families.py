"""TransformersBackend cache invariants on tiny random LLaVA, Idefics3, Qwen2-VL and Qwen2.5-VL.

Each family is built in-process (tests/families.py), saved with ``save_pretrained`` and loaded
back through ``TransformersBackend.from_pretrained`` once per session. The ground truth for
every cached computation is ``reference_logits``: one fresh, uncached forward over the
session's tokens with the family's own position logic (3-D M-RoPE for the Qwen families).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from families import FAMILIES, JUDGE, Family, build_family, sample_images
from PIL import Image

from dreamr_stream.backends.hf import HFSession, TransformersBackend
from dreamr_stream.config import JudgeTemplate

STOP = "\n"
STEP_TOKENS = 6
QUESTION_A = "how many red cells are there?"
QUESTION_B = "what colour is the top right square?"
CACHED_TOL = 1e-4  # cached vs uncached forwards of a float32 model


@dataclass
class Built:
    family: Family
    model: Any  # the in-memory model that was saved
    processor: Any
    folder: Path
    backend: TransformersBackend  # loaded back from ``folder``


@pytest.fixture(scope="session", params=FAMILIES, ids=lambda f: f.name)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    family: Family = request.param
    folder = tmp_path_factory.mktemp(family.name)
    model, processor = build_family(family, folder)
    backend = TransformersBackend.from_pretrained(folder, device="cpu")
    return Built(family, model, processor, folder, backend)


@pytest.fixture(scope="session")
def images() -> tuple[Image.Image, Image.Image]:
    return sample_images()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def assert_matches_reference(backend: TransformersBackend, s: HFSession, tol: float = CACHED_TOL) -> None:
    """Every logits row the session kept equals the uncached forward's row for that length."""
    ref = backend.reference_logits(s)
    assert ref.shape[0] == s.length
    assert s.length in s.logits_at, "no logits for the session's current length"
    for n, logits in sorted(s.logits_at.items()):
        assert n <= s.length
        assert max_diff(ref[n - 1], logits) < tol, f"logits after {n} of {s.length} tokens differ from a fresh forward"


def step(backend: TransformersBackend, s: HFSession, **kw: Any) -> str:
    out = backend.generate_step(s, max_tokens=STEP_TOKENS, stop=STOP, **kw)
    assert out.done
    return out.text


# --------------------------------------------------------------------------------------------- 1
def test_loaded_backend_matches_in_memory_model(built: Built, images: tuple[Image.Image, Image.Image]) -> None:
    loaded = built.backend
    assert loaded.judge == JUDGE  # read from the dreamr.json sidecar
    assert type(loaded.model) is type(built.model)
    assert type(loaded.processor).__name__ == type(built.processor).__name__
    in_memory = TransformersBackend(built.model, built.processor, name="in-memory", judge=JUDGE)
    assert loaded.eos_ids == in_memory.eos_ids
    for image, question in zip(images, (QUESTION_A, QUESTION_B), strict=True):
        a = in_memory.open_session(image, question)
        b = loaded.open_session(image, question)
        assert a.ids == b.ids
        assert max_diff(a.logits_at[a.length], b.logits_at[b.length]) < 1e-5
        assert max_diff(in_memory.reference_logits(a), loaded.reference_logits(b)) < 1e-5


# --------------------------------------------------------------------------------------------- 2
def test_rollback_then_append_equals_fresh_forward(built: Built, images: tuple[Image.Image, Image.Image]) -> None:
    be = built.backend
    s = be.open_session(images[0], QUESTION_A)
    assert_matches_reference(be, s, tol=1e-5)  # prefill vs the reference: same inputs, one forward
    step(be, s)
    before = s.length
    scored = be.score(s, "three red cells", stop=STOP, judge=JUDGE)
    assert s.length == before + scored.n_tokens  # candidate + delimiter stay, the judge suffix does not
    assert 0.0 < scored.p_pos < 1.0 and 0.0 < scored.p_neg < 1.0
    be.rollback(s, scored.n_tokens)  # reject
    assert s.length == before
    appended = be.append(s, "the top row has two", stop=STOP)
    assert s.length == before + appended
    assert max_diff(be.reference_logits(s)[-1], s.logits_at[s.length]) < CACHED_TOL
    assert_matches_reference(be, s)
    step(be, s)  # decoding goes on from the re-appended step
    assert_matches_reference(be, s)


def test_accept_path_equals_fresh_forward(built: Built, images: tuple[Image.Image, Image.Image]) -> None:
    be = built.backend
    s = be.open_session(images[1], QUESTION_B)
    step(be, s)
    before = s.length
    scored = be.score(s, "the square is white", stop=STOP, judge=JUDGE)  # accept: keep it
    assert s.length == before + scored.n_tokens
    assert max_diff(be.reference_logits(s)[-1], s.logits_at[s.length]) < CACHED_TOL
    assert_matches_reference(be, s)
    # the step written after an accepted candidate sees the candidate, not the judge suffix
    step(be, s)
    assert_matches_reference(be, s)
    # a likelihood-mode score (no judge) and its rejection
    plain = be.score(s, "so the answer is one", stop=STOP, judge=None)
    assert plain.p_pos == plain.p_neg == 0.0
    assert_matches_reference(be, s)
    be.rollback(s, plain.n_tokens)
    assert_matches_reference(be, s)


def test_rollback_inside_a_step_recomputes_logits(built: Built, images: tuple[Image.Image, Image.Image]) -> None:
    """Rolling back to a length whose logits were never kept (mid-step, mid-partial) still
    resumes from the right logits (``_ensure_logits``)."""
    be = built.backend
    s = be.open_session(images[0], QUESTION_B)
    step(be, s)
    be.append(s, "count the cells", stop=STOP)
    be.rollback(s, 2)  # into the appended step
    assert s.length not in s.logits_at
    be.append(s, "row one", stop=STOP)
    assert_matches_reference(be, s)
    out = be.generate_step(s, max_tokens=STEP_TOKENS, stop=STOP, budget=2)  # a half-decoded step
    be.rollback(s, out.new_tokens)
    assert not s.partial
    be.score(s, "two", stop=STOP, judge=JUDGE)
    assert_matches_reference(be, s)


# --------------------------------------------------------------------------------------------- 3
def _alone(be: TransformersBackend, image: Image.Image, question: str, steps: int) -> tuple[list[str], HFSession]:
    s = be.open_session(image, question)
    return [step(be, s) for _ in range(steps)], s


def test_interleaved_sessions_equal_each_alone(built: Built, images: tuple[Image.Image, Image.Image]) -> None:
    be, steps = built.backend, 3
    a_text, a_alone = _alone(be, images[0], QUESTION_A, steps)
    b_text, b_alone = _alone(be, images[1], QUESTION_B, steps)

    sessions = {"a": be.open_session(images[0], QUESTION_A), "b": be.open_session(images[1], QUESTION_B)}
    texts: dict[str, list[str]] = {"a": [], "b": []}
    for _ in range(steps * (STEP_TOKENS + 2)):
        for key, s in sessions.items():  # one token of A, one of B, ...
            if len(texts[key]) < steps:
                out = be.generate_step(s, max_tokens=STEP_TOKENS, stop=STOP, budget=1)
                if out.done:
                    texts[key].append(out.text)
    a, b = sessions["a"], sessions["b"]
    assert texts["a"] == a_text
    assert texts["b"] == b_text
    assert a.ids == a_alone.ids and b.ids == b_alone.ids
    assert max_diff(a.logits_at[a.length], a_alone.logits_at[a_alone.length]) < 1e-5
    assert max_diff(b.logits_at[b.length], b_alone.logits_at[b_alone.length]) < 1e-5
    assert_matches_reference(be, a)
    assert_matches_reference(be, b)
    if built.family.mrope:  # the two prompts really do have different M-RoPE offsets
        assert a.rope_deltas is not None and b.rope_deltas is not None
        assert int(a.rope_deltas.flatten()[0]) != int(b.rope_deltas.flatten()[0])


# --------------------------------------------------------------------------------------------- 4
@pytest.mark.parametrize("judge", [None, JUDGE], ids=["likelihood", "judge"])
def test_one_forward_score_equals_token_by_token(
    built: Built, images: tuple[Image.Image, Image.Image], judge: JudgeTemplate | None
) -> None:
    be = built.backend
    s = be.open_session(images[1], QUESTION_A)
    step(be, s)
    twin = be.fork(s)
    before = s.length
    text = "the grid has four red cells"
    scored = be.score(s, text, stop=STOP, judge=judge)
    text_ids = be.encode(text)
    assert len(scored.token_logprobs) == len(text_ids)
    assert scored.n_tokens == len(text_ids) + len(be.encode(STOP))

    # the same tokens fed one forward at a time on a twin session
    fed = [*text_ids, *be.encode(STOP), *(be.encode(judge.suffix) if judge else [])]
    stepwise = []
    for token in fed:
        stepwise.append(torch.log_softmax(twin.logits_at[twin.length], dim=-1)[token])
        be._run(be._forward, twin, [token])
    stepwise_lp = torch.stack(stepwise[: len(text_ids)])
    assert max_diff(torch.tensor(scored.token_logprobs), stepwise_lp) < CACHED_TOL
    if judge is not None:
        pos, neg = be.verdict_ids(judge)
        probs = torch.softmax(twin.logits_at[twin.length], dim=-1)
        assert abs(scored.p_pos - float(probs[pos])) < CACHED_TOL
        assert abs(scored.p_neg - float(probs[neg])) < CACHED_TOL

    # and the uncached reference over the session that now holds the candidate
    ref = torch.log_softmax(be.reference_logits(s), dim=-1)
    ref_lp = torch.stack([ref[before - 1 + i, t] for i, t in enumerate(text_ids)])
    assert max_diff(torch.tensor(scored.token_logprobs), ref_lp) < CACHED_TOL


# --------------------------------------------------------------------------------------------- 5
def test_fork_is_independent(built: Built, images: tuple[Image.Image, Image.Image]) -> None:
    be = built.backend
    s = be.open_session(images[0], QUESTION_A)
    first = step(be, s)
    ids, logits = list(s.ids), s.logits_at[s.length].clone()

    fork = be.fork(s)
    for _ in range(2):
        step(be, fork)
    scored = be.score(fork, "a step on the fork", stop=STOP, judge=JUDGE)
    be.rollback(fork, scored.n_tokens + 1)
    be.append(fork, "another", stop=STOP)
    assert fork.ids[: len(ids)] == ids and fork.length > len(ids)

    assert s.ids == ids
    assert max_diff(s.logits_at[s.length], logits) == 0.0
    assert_matches_reference(be, s)
    assert_matches_reference(be, fork)

    # the original continues exactly like a session that was never forked
    texts_never_forked, never_forked = _alone(be, images[0], QUESTION_A, 3)
    assert texts_never_forked[0] == first
    rest = [step(be, s) for _ in range(2)]
    assert rest == texts_never_forked[1:]
    assert s.ids == never_forked.ids
    assert max_diff(s.logits_at[s.length], never_forked.logits_at[never_forked.length]) < 1e-5


# --------------------------------------------------------------------------------------------- 6
def _pieces(be: TransformersBackend, tokens: list[int]) -> list[tuple[str, str]]:
    """(text before token i, text token i adds) for each generated token."""
    out = []
    for i in range(len(tokens)):
        prev, full = be.decode(tokens[:i]), be.decode(tokens[: i + 1])
        out.append((prev, full[len(prev) :] if full.startswith(prev) else ""))
    return out


def test_stop_string_ends_the_step(built: Built, images: tuple[Image.Image, Image.Image]) -> None:
    """A stop string that is a whole generated token ends the step as is; one that ends inside
    a token makes the backend re-append ``tok(step) + tok(stop)`` (``_canonicalise``). Either
    way the cache must hold exactly what a fresh forward over the kept tokens computes."""
    be = built.backend
    probe = be.open_session(images[0], QUESTION_A)
    step(be, probe)
    generated = probe.ids[probe.prompt_len : probe.prompt_len + STEP_TOKENS]
    pieces = _pieces(be, generated)

    # 1. the stop is the text of a whole token: no re-encoding
    i, (prev, piece) = next((i, p) for i, p in reversed(list(enumerate(pieces))) if i > 0 and p[1] and p[1] not in p[0])
    s = be.open_session(images[0], QUESTION_A)
    out = be.generate_step(s, max_tokens=STEP_TOKENS, stop=piece)
    assert out.done and not out.eos and out.text == prev and out.new_tokens == i + 1
    assert s.ids == probe.ids[: probe.prompt_len + i + 1]
    assert_matches_reference(be, s)

    # 2. the stop ends inside a token: the step is re-tokenised with the stop on its own
    i, (prev, piece) = next(
        (i, p)
        for i, p in reversed(list(enumerate(pieces)))
        if len(p[1]) >= 2 and p[1][1].isprintable() and p[1][1] not in p[0] + p[1][0]
    )
    stop = piece[1]
    s = be.open_session(images[0], QUESTION_A)
    out = be.generate_step(s, max_tokens=STEP_TOKENS, stop=stop)
    assert out.done and out.text == prev + piece[0]
    assert s.ids[s.prompt_len :] == be.encode(out.text) + be.encode(stop)
    assert not s.partial
    assert_matches_reference(be, s)
    step(be, s)  # and decoding goes on from there
    assert_matches_reference(be, s)
