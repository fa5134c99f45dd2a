"""SAPO: reward and advantage formulas, and an update that moves log-probs the right way."""

from __future__ import annotations

import copy
import itertools
import math
import random

import pytest
import torch

from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.sapo.draft import TransformersDraft
from dreamr_stream.sapo.policy import PolicySample, sapo_loss, step_logprobs
from dreamr_stream.sapo.rewards import RewardWeights, group_advantages, step_reward
from dreamr_stream.sapo.rollouts import RolloutPrompt, TransformersScorer, rollout_group
from dreamr_stream.sapo.trainer import sapo_update
from dreamr_stream.tasks.grid.puzzles import make_puzzle


def test_reward_formula() -> None:
    w = RewardWeights(faith=1.0, agree=2.0, length=0.5)
    r = step_reward(p_pos=0.6, p_neg=0.2, text="a b", n_tokens=3, target_step="a b", target_tokens=3, weights=w)
    assert r == pytest.approx(0.75 + 2.0)
    longer = step_reward(
        p_pos=0.6, p_neg=0.2, text="a b c d", n_tokens=6, target_step="a b", target_tokens=3, weights=w
    )
    assert longer == pytest.approx(0.75 - 0.5 * (6 - 3) / 3)
    shorter = step_reward(p_pos=0.0, p_neg=0.0, text="a", n_tokens=2, target_step="a b", target_tokens=3, weights=w)
    assert shorter == 0.0  # no evidence, no agreement, no length penalty below the target's length


def test_group_advantages_formula() -> None:
    rewards = [1.0, 2.0, 4.0, 5.0]
    adv = group_advantages(rewards)
    mean, std = 3.0, math.sqrt(2.5)
    assert adv == pytest.approx([(r - mean) / (std + 1e-4) for r in rewards])
    assert sum(adv) == pytest.approx(0.0, abs=1e-9)
    assert group_advantages([0.7, 0.7, 0.7]) == [0.0, 0.0, 0.0]


def _sample(backend: TransformersBackend, text: str, advantage: float) -> PolicySample:
    puzzle = make_puzzle(3)
    prompt = backend.prompt_inputs(puzzle.image, puzzle.question.text())
    ids = backend.encode(text) + backend.encode("\n")
    return PolicySample(prompt=prompt, context_ids=backend.encode("Row 1: empty.\n"), step_ids=ids, advantage=advantage)


def total_logprob(model: torch.nn.Module, sample: PolicySample, pad: int) -> float:
    with torch.no_grad():
        return float(step_logprobs(model, [sample], pad)[0].sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_one_update_moves_rewarded_steps_up_and_punished_steps_down(tiny_pair, seed: int) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    _, draft = tiny_pair
    policy = copy.deepcopy(draft.model)
    backend = TransformersBackend(policy, draft.processor, judge=draft.judge)
    ref = copy.deepcopy(policy)
    pad = draft.tokenizer.pad_token_id
    good = _sample(backend, "Row 2: red circle, empty.", +1.0)
    bad = _sample(backend, "Row 2: blue square, blue square.", -1.0)
    before = (total_logprob(policy, good, pad), total_logprob(policy, bad, pad))
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    stats = sapo_update(policy, ref, opt, [good, bad], pad_id=pad, clip_eps=0.2, kl_beta=0.0)
    after = (total_logprob(policy, good, pad), total_logprob(policy, bad, pad))
    assert after[0] > before[0], "a positively rewarded step must become more likely"
    assert after[1] < before[1], "a negatively rewarded step must become less likely"
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)  # measured before the first step


def test_loss_terms_at_the_starting_point(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    _, draft = tiny_pair
    s = _sample(draft, "Answer: 3", 2.0)
    lp = step_logprobs(draft.model, [s], draft.tokenizer.pad_token_id)
    s.old_logprobs, s.ref_logprobs = lp[0].detach(), lp[0].detach()
    loss, stats = sapo_loss(lp, [s], clip_eps=0.2, kl_beta=1.0)
    # ratio = 1, KL = 0: loss = -A
    assert float(loss.detach()) == pytest.approx(-2.0) and stats.kl == 0.0 and stats.clip_fraction == 0.0


def test_rollout_group_scores_and_normalises(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    target, draft = tiny_pair
    puzzle = make_puzzle(5)
    prompt = RolloutPrompt(puzzle.image, puzzle.question.text(), puzzle.steps())
    group = rollout_group(
        TransformersScorer(target),
        TransformersDraft(draft),
        prompt,
        1,
        group_size=4,
        temperature=1.5,
        weights=RewardWeights(),
        rng=random.Random(0),
        max_step_tokens=8,
    )
    assert len(group) == 4
    rewards = [s.meta["reward"] for s in group]
    assert [s.advantage for s in group] == pytest.approx(group_advantages(rewards))
    for s in group:
        assert 0.0 <= s.meta["p_pos"] <= 1.0 and s.step_ids and s.context_ids


@pytest.mark.parametrize("k", [1, -1])
def test_guided_group_holds_the_target_step_tokenised_as_appended(tiny_pair, k: int) -> None:  # type: ignore[no-untyped-def]
    target, draft = tiny_pair
    puzzle = make_puzzle(5)
    steps = puzzle.steps()
    k = k % len(steps)
    prompt = RolloutPrompt(puzzle.image, puzzle.question.text(), steps)
    group = rollout_group(
        TransformersScorer(target),
        TransformersDraft(draft),
        prompt,
        k,
        group_size=3,
        temperature=1.5,
        weights=RewardWeights(),
        rng=random.Random(0),
        max_step_tokens=8,
        guide=True,
    )
    assert len(group) == 4 and [s.meta["guide"] for s in group] == [False, False, False, True]
    guide = group[-1]
    end = [next(iter(draft.eos_ids))] if k == len(steps) - 1 else draft.encode("\n")
    assert guide.step_ids == draft.encode(steps[k]) + end
    assert guide.meta["agree"] and guide.meta["text"] == steps[k]
    assert guide.off_policy and not any(s.off_policy for s in group[:-1])
    # the guide agrees exactly and is no longer than itself: its reward is the group's best
    assert guide.meta["reward"] >= max(s.meta["reward"] for s in group[:-1]) - 1.0 + 1e-9
    assert [s.advantage for s in group] == pytest.approx(group_advantages([s.meta["reward"] for s in group]))


def _session_at(backend: TransformersBackend, puzzle, k: int):  # type: ignore[no-untyped-def]
    s = backend.open_session(puzzle.image, puzzle.question.text())
    for step in puzzle.steps()[:k]:
        backend.append(s, step, stop="\n")
    return s


def test_batched_scoring_equals_the_backends_one_forward_score(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    from dreamr_stream.sapo.rollouts import _context, score_steps

    target, _ = tiny_pair
    puzzle = make_puzzle(7)
    k = 2
    texts = [puzzle.steps()[k], "Row 3: empty, empty, red square, empty. Red: 1.", "Answer: 4"]
    inputs = target.prompt_inputs(puzzle.image, puzzle.question.text())
    batched = score_steps(target, inputs, _context(target, puzzle.steps()[:k], "\n"), texts, judge=True)
    for text, score in zip(texts, batched, strict=True):
        s = _session_at(target, puzzle, k)
        one = target.score(s, text, stop="\n", judge=target.judge)
        target.close(s)
        assert score.p_pos == pytest.approx(one.p_pos, abs=1e-5) and score.p_neg == pytest.approx(one.p_neg, abs=1e-5)
        assert score.token_logprobs == pytest.approx(one.token_logprobs, abs=1e-4)
        # the teacher rows: the target's next-token distribution at each step position (and the
        # delimiter's), whose entries at the step's own tokens are the evidence above
        ids = target.encode(text)
        assert score.next_logprobs is not None and score.next_logprobs.shape[0] == len(ids) + 1
        picked = score.next_logprobs[: len(ids)].gather(1, torch.tensor(ids)[:, None])[:, 0].tolist()
        assert picked == pytest.approx(one.token_logprobs, abs=1e-4)
        assert torch.exp(score.next_logprobs).sum(-1).tolist() == pytest.approx([1.0] * (len(ids) + 1), abs=1e-4)


@pytest.mark.parametrize("k", [0, 3])
def test_batched_greedy_sampling_equals_the_backends_decode_loop(tiny_pair, k: int) -> None:  # type: ignore[no-untyped-def]
    from dreamr_stream.sapo.draft import StepSampling
    from dreamr_stream.sapo.rollouts import _context

    _, draft = tiny_pair
    puzzle = make_puzzle(11)
    inputs = draft.prompt_inputs(puzzle.image, puzzle.question.text())
    context = _context(draft, puzzle.steps()[:k], "\n")
    steps = TransformersDraft(draft).sample_steps(
        inputs, context, 3, StepSampling(temperature=0.0, max_tokens=12), seed=0
    )
    s = _session_at(draft, puzzle, k)
    before = len(s.ids)
    out = draft.generate_step(s, max_tokens=12, stop="\n")
    expected_ids = s.ids[before:] + ([next(iter(draft.eos_ids))] if out.eos else [])
    draft.close(s)
    for ids, text, ended in steps:  # greedy: all three alike, and like the decode loop
        assert (ids, text, ended) == (expected_ids, out.text, out.eos)


def test_trainer_runs_logs_checkpoints_and_resumes(tiny_pair, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from dreamr_stream.sapo.config import SapoConfig
    from dreamr_stream.sapo.trainer import train
    from dreamr_stream.tasks.grid.puzzles import Split, split_seed
    from dreamr_stream.zoo.prompts import demo_prompts

    target, draft = tiny_pair
    folders = {}
    for name, backend in (("target", target), ("draft", draft)):
        folders[name] = tmp_path / name
        backend.model.save_pretrained(folders[name])
        backend.processor.save_pretrained(folders[name])
    out = tmp_path / "run"
    out.mkdir()
    # reference trajectories stand in for the target's own (a random tiny target never ends a step)
    with (out / "trajectories.jsonl").open("w") as f:
        splits: tuple[tuple[Split, int], ...] = (("train", 2), ("val", 1))
        for split, n in splits:
            for i in range(n):
                f.write(json.dumps({"key": f"{split}:{i}", "steps": make_puzzle(split_seed(split, i)).steps()}) + "\n")
    cfg = SapoConfig(steps=2, groups_per_step=2, group_size=2, pool=2, eval_prompts=1, eval_every=1, threads=1)
    final = train(cfg, folders["target"], folders["draft"], out, demo_prompts(cfg.pool, cfg.eval_prompts))
    assert (final / "model.safetensors").exists() and (out / "checkpoint" / "state.pt").exists()
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "acceptance" in r] == [0, 1, 2]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]
    cfg = cfg.model_copy(update={"steps": 3})  # resumes at update 2: one more update, no second baseline evaluation
    train(cfg, folders["target"], folders["draft"], out, demo_prompts(cfg.pool, cfg.eval_prompts))
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3]
    assert [r["step"] for r in rows if "acceptance" in r] == [0, 1, 2, 3]


def test_trainer_focus_draws_groups_at_rejected_prefixes(tiny_pair, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import json

    from dreamr_stream.sapo import trainer
    from dreamr_stream.sapo.config import SapoConfig
    from dreamr_stream.tasks.grid.puzzles import split_seed
    from dreamr_stream.zoo.prompts import demo_prompts

    target, draft = tiny_pair
    for name, backend in (("target", target), ("draft", draft)):
        backend.model.save_pretrained(tmp_path / name)
        backend.processor.save_pretrained(tmp_path / name)
    out = tmp_path / "run"
    out.mkdir()
    with (out / "trajectories.jsonl").open("w") as f:
        for key, seed in (("train:0", split_seed("train", 0)), ("train:1", split_seed("train", 1)), ("val:0", 9)):
            f.write(json.dumps({"key": key, "steps": make_puzzle(seed).steps()[:3]}) + "\n")
    drawn: list[int] = []
    real = trainer.rollout_group

    def spy(target, draft, prompt, k, **kw):  # type: ignore[no-untyped-def]
        drawn.append(k)
        return real(target, draft, prompt, k, **kw)

    monkeypatch.setattr(trainer, "rollout_group", spy)
    # the draft misses only the middle step (k = 1): with focus 1 every group is drawn there
    monkeypatch.setattr(trainer, "greedy_matches", lambda d, image, question, steps, **kw: [True, False, True])
    cfg = SapoConfig(
        steps=2, groups_per_step=2, max_tries=2, group_size=2, pool=2, eval_prompts=1, eval_every=1, focus=1.0
    )
    trainer.train(cfg, tmp_path / "target", tmp_path / "draft", out, demo_prompts(cfg.pool, cfg.eval_prompts))
    assert len(drawn) >= 4 and set(drawn) == {1}


def test_credit_stops_at_the_first_token_the_target_rejects() -> None:
    lp = torch.zeros(5, requires_grad=True)
    s = PolicySample(prompt={}, context_ids=[], step_ids=[1, 2, 3, 4, 5], advantage=-1.0, credit=2)
    s.old_logprobs, s.ref_logprobs = lp.detach().clone(), lp.detach().clone()
    loss, _ = sapo_loss([lp], [s], clip_eps=0.2, kl_beta=0.1)
    loss.backward()
    assert lp.grad is not None
    assert lp.grad[:2].abs().min() > 0 and lp.grad[2:].abs().max() == 0  # no credit after the error


def test_credit_position_from_the_targets_token_probabilities(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    import math as m

    from dreamr_stream.sapo.rollouts import _credit
    from dreamr_stream.verify import JudgeVerifier, LikelihoodVerifier

    target, backend = tiny_pair
    draft = TransformersDraft(backend)
    text = "Row 1: empty, red square."
    ids = draft.encode(text) + draft.encode("\n")
    n = len(draft.encode(text))
    floor = m.log(0.25 / 1.25)
    lps = [-0.01] * n
    assert _credit(draft, target, text, ids, lps, LikelihoodVerifier(0.25)) is None  # all accepted: all credited
    lps[3] = floor - 0.1
    assert _credit(draft, target, text, ids, lps, LikelihoodVerifier(0.25)) == 4
    assert _credit(draft, target, text, ids, lps, JudgeVerifier(1.0)) is None  # no per-token evidence


def _kl_to(teacher: torch.Tensor, model: torch.nn.Module, sample: PolicySample, pad: int) -> float:
    from dreamr_stream.sapo.policy import step_distributions

    with torch.no_grad():
        d = step_distributions(model, [sample], pad)[0]
    return float((teacher.exp() * (teacher - d)).sum(-1).mean())


def test_dense_term_moves_the_draft_towards_the_targets_distribution(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    target, draft = tiny_pair
    policy = copy.deepcopy(draft.model)
    backend = TransformersBackend(policy, draft.processor, judge=draft.judge)
    pad = draft.tokenizer.pad_token_id
    s = _sample(backend, "Row 2: red circle, empty.", 0.0)  # no advantage: only the dense term acts
    # the teacher: the target's own distributions at the step's positions
    from dreamr_stream.sapo.policy import step_distributions

    with torch.no_grad():
        s.teacher = step_distributions(target.model, [s], pad)[0]
    before = _kl_to(s.teacher, policy, s, pad)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    stats = sapo_update(policy, copy.deepcopy(policy), opt, [s], pad_id=pad, clip_eps=0.2, kl_beta=0.0, distill=1.0)
    assert stats["distill"] == pytest.approx(before, rel=1e-4)
    assert _kl_to(s.teacher, policy, s, pad) < before, "the dense term must bring the draft closer to the target"
    # without a teacher (or with weight 0) the same update changes nothing: the advantage is 0
    s2 = _sample(backend, "Row 2: red circle, empty.", 0.0)
    lp = total_logprob(policy, s2, pad)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3, weight_decay=0.0)  # no momentum carried over
    sapo_update(policy, copy.deepcopy(policy), opt, [s2], pad_id=pad, clip_eps=0.2, kl_beta=0.0, distill=1.0)
    assert total_logprob(policy, s2, pad) == pytest.approx(lp, abs=1e-3)


def test_dense_term_formula_and_credit() -> None:
    from dreamr_stream.sapo.policy import gather_steps

    q = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]), -1)
    d = torch.full((3, 3), -math.log(3.0), requires_grad=True)
    s = PolicySample(prompt={}, context_ids=[], step_ids=[0, 1, 2], advantage=0.0, credit=2, teacher=q)
    lp = gather_steps([d], [s])
    s.old_logprobs, s.ref_logprobs = lp[0].detach().clone(), lp[0].detach().clone()
    loss, stats = sapo_loss(lp, [s], kl_beta=0.0, distill=0.5, dists=[d])
    expected = float((q.exp() * (q - d.detach())).sum(-1)[:2].mean())  # credited positions only
    assert stats.distill == pytest.approx(expected) and float(loss) == pytest.approx(0.5 * expected)
    loss.backward()
    assert d.grad is not None and d.grad[2].abs().max() == 0 and d.grad[:2].abs().min() > 0
    with pytest.raises(ValueError, match="dists"):
        sapo_loss(lp, [s], distill=0.5)


def test_sapo_card_notes_come_from_the_run_folder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from dreamr_stream.sapo.config import SapoConfig
    from dreamr_stream.zoo.cards import sapo_notes

    (tmp_path / "config.json").write_text(json.dumps(SapoConfig(lr=2e-4, distill=5.0).model_dump()))
    rows = [
        {"step": 0, "acceptance": 0.5, "step_tokens": 18.0, "judged": 12},
        {"step": 1, "reward": 0.3, "kl": 0.0, "s": 30.0},
        {"step": 2, "reward": 0.4, "kl": 0.0, "s": 90.0},
        {"step": 2, "acceptance": 0.75, "step_tokens": 17.0, "judged": 12},
    ]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    notes = sapo_notes(tmp_path, command="dreamr sapo train --out runs/x")
    assert "`dreamr sapo train --out runs/x` (2 updates, about 2 min" in notes
    assert '"lr": 0.0002' in notes and '"distill": 5.0' in notes
    assert "by update: 0: 50.0%, 2: 75.0%." in notes
    assert "dense term adds" in notes and "drawn at prefixes" not in notes and "unclipped" not in notes
    (tmp_path / "config.json").write_text(
        json.dumps(SapoConfig(focus=0.9, pool=500, guide_clip=False, token_mean=True).model_dump())
    )
    notes = sapo_notes(tmp_path, command="dreamr sapo train --out runs/x")
    assert "90% of groups are drawn at prefixes" in notes and "out of 500 train puzzles" in notes
    assert "ratio unclipped" in notes and "credited tokens" in notes and "dense term" not in notes
    assert "anchors the draft" not in notes and "cosine" not in notes
    (tmp_path / "config.json").write_text(json.dumps(SapoConfig(anchor=5.0, anchor_puzzles=16).model_dump()))
    notes = sapo_notes(tmp_path, command="dreamr sapo train --out runs/x")
    assert "draws 16 train puzzles whose whole target trajectory anchors the draft: 5 x its mean" in notes
    (tmp_path / "config.json").write_text(json.dumps(SapoConfig(warmup=5, decay=100).model_dump()))
    notes = sapo_notes(tmp_path, command="dreamr sapo train --out runs/x")
    assert "warms up over 5 updates, then falls on a cosine to 0 at update 100." in notes


def test_off_policy_guide_is_not_clipped(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    """Past the clip range a positive on-policy sample stops pulling; the target's guide step
    (off-policy) keeps its full gradient."""
    _, draft = tiny_pair
    grads = {}
    for off in (False, True):
        s = _sample(draft, "Row 2: red circle, empty.", 1.0)
        s.off_policy = off
        lp = step_logprobs(draft.model, [s], draft.tokenizer.pad_token_id)
        # the sampler saw this step as half as likely as now: ratio 2 > 1 + eps
        s.old_logprobs, s.ref_logprobs = lp[0].detach() - math.log(2.0), lp[0].detach()
        draft.model.zero_grad(set_to_none=True)
        loss, stats = sapo_loss(lp, [s], clip_eps=0.2, kl_beta=0.0, clip_off_policy=False)
        loss.backward()
        grads[off] = sum(float(p.grad.abs().sum()) for p in draft.model.parameters() if p.grad is not None)
        assert stats.clip_fraction == 1.0  # reported either way
        assert float(loss.detach()) == pytest.approx(-1.2 if not off else -2.0, rel=1e-5)
    draft.model.zero_grad(set_to_none=True)
    assert grads[False] == 0.0 and grads[True] > 0.0
    # with the default, off-policy samples are clipped like the rest
    s = _sample(draft, "Row 2: red circle, empty.", 1.0)
    s.off_policy = True
    lp = step_logprobs(draft.model, [s], draft.tokenizer.pad_token_id)
    s.old_logprobs, s.ref_logprobs = lp[0].detach() - math.log(2.0), lp[0].detach()
    assert float(sapo_loss(lp, [s], clip_eps=0.2, kl_beta=0.0)[0].detach()) == pytest.approx(-1.2, rel=1e-5)


def test_greedy_verdicts_are_what_acceptance_counts(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    from dreamr_stream.sapo.acceptance import acceptance_at_prefixes, scored_greedy_steps, verdicts_of
    from dreamr_stream.verify import LikelihoodVerifier

    target, draft = tiny_pair
    prompts = []
    for seed in (3, 4):
        puzzle = make_puzzle(seed)
        prompts.append(RolloutPrompt(puzzle.image, puzzle.question.text(), puzzle.steps()[:3]))
    prompts[1].start = 1
    # tau chosen so that a random tiny target accepts some steps and rejects others
    verifier = LikelihoodVerifier(tau=1e-3, aggregate="mean")
    verdicts = verdicts_of(scored_greedy_steps(target, draft, prompts, judge=verifier.needs_judge), draft, verifier)
    assert [(v.prompt, v.k) for v in verdicts] == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2)]
    acc = acceptance_at_prefixes(target, TransformersDraft(draft), prompts, verifier)
    assert acc["judged"] == 5 and acc["acceptance"] == pytest.approx(sum(v.accepted for v in verdicts) / 5)
    for v in verdicts:  # each verdict is TBVM's on the draft's own greedy step at that prefix
        p = prompts[v.prompt]
        ds, ts = draft.open_session(p.image, p.question), target.open_session(p.image, p.question)
        for step in p.steps[: v.k]:
            draft.append(ds, step, stop="\n")
            target.append(ts, step, stop="\n")
        text = draft.generate_step(ds, max_tokens=64, stop="\n").text
        score = target.score(ts, text, stop="\n", judge=None)
        assert verifier.verify(score.p_pos, score.p_neg, score.token_logprobs).accepted == v.accepted
        assert v.tokens == len(draft.encode(text))
        draft.close(ds)
        target.close(ts)


def test_greedy_matches_agrees_with_the_drafts_decode_loop() -> None:
    """One teacher-forced forward says, per prefix, whether decoding the shipped SFT draft
    writes the step exactly (it does at most prefixes and not at all)."""
    from dreamr_stream.backends.shipped import demo_paths
    from dreamr_stream.sapo.trajectories import greedy_matches
    from dreamr_stream.tasks.grid.puzzles import split_seed

    draft = TransformersBackend.from_pretrained(demo_paths("sft").draft, device="cpu", name="draft")
    said = []
    for i in range(8):
        puzzle = make_puzzle(split_seed("val", i))
        image, question, steps = puzzle.image, puzzle.question.text(), puzzle.steps()
        matches = greedy_matches(TransformersDraft(draft), image, question, steps)
        for k, step in enumerate(steps):
            s = _session_at(draft, puzzle, k)
            out = draft.generate_step(s, max_tokens=96, stop="\n")
            draft.close(s)
            assert matches[k] == (out.text == step and out.eos == (k == len(steps) - 1)), (i, k, out.text)
        said += matches
    assert any(said) and not all(said)


def test_greedy_writes_agrees_with_decoding_the_shipped_target() -> None:
    """The one-forward check says "the target writes the reference" exactly when decoding the
    target step by step gives the reference (on the shipped target, which mostly does)."""
    from dreamr_stream.backends.shipped import demo_paths
    from dreamr_stream.sapo.trajectories import greedy_writes, target_trajectory
    from dreamr_stream.tasks.grid.puzzles import split_seed

    target = TransformersBackend.from_pretrained(demo_paths("sft").target, device="cpu", name="target")
    said = []
    for i in range(6):
        puzzle = make_puzzle(split_seed("val", i))
        image, question, reference = puzzle.image, puzzle.question.text(), puzzle.steps()
        writes = greedy_writes(target, image, question, reference)
        assert writes == (target_trajectory(target, image, question) == reference)
        said.append(writes)
        # a wrong number in any step, or a missing last step, is not what the target writes
        wrong = [*reference[:-1], reference[-1] + "1"]
        assert not greedy_writes(target, image, question, wrong)
        assert not greedy_writes(target, image, question, reference[:-1])
    assert any(said)


def test_token_mean_weighs_credited_tokens_not_samples(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    _, draft = tiny_pair
    good = _sample(draft, "Row 2: red circle, empty.", 1.0)
    bad = _sample(draft, "Row 2: red square, empty.", -1.0)
    bad.credit = 2  # the error sits at its second token: nothing after it is credited
    samples = [good, bad]
    lps = step_logprobs(draft.model, samples, draft.tokenizer.pad_token_id)
    for s, lp in zip(samples, lps, strict=True):
        s.old_logprobs, s.ref_logprobs = lp.detach(), lp.detach()
    # at the starting point every credited token contributes -A (ratio 1, KL 0)
    per_sample, _ = sapo_loss(lps, samples, clip_eps=0.2, kl_beta=0.1)
    per_token, _ = sapo_loss(lps, samples, clip_eps=0.2, kl_beta=0.1, token_mean=True)
    n = len(good.step_ids)
    assert float(per_sample.detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(per_token.detach()) == pytest.approx(-(n * 1.0 + 2 * -1.0) / (n + 2), rel=1e-5)


def test_trajectory_sample_is_the_trajectory_as_the_backend_appends_it(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    from dreamr_stream.sapo.rollouts import trajectory_sample

    _, draft = tiny_pair
    puzzle = make_puzzle(5)
    steps = puzzle.steps()
    sample = trajectory_sample(
        TransformersDraft(draft), RolloutPrompt(puzzle.image, puzzle.question.text(), steps, key="k")
    )
    s = _session_at(draft, puzzle, 0)
    start = len(s.ids)
    for step in steps[:-1]:
        draft.append(s, step, stop="\n")
    expected = s.ids[start:] + draft.encode(steps[-1]) + [next(iter(draft.eos_ids))]
    assert sample.prompt["input_ids"][0].tolist() == s.ids[:start]
    draft.close(s)
    assert sample.context_ids == [] and sample.step_ids == expected and sample.off_policy


def test_anchor_term_raises_the_trajectorys_likelihood(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    from dreamr_stream.sapo.rollouts import trajectory_sample

    _, draft = tiny_pair
    policy = copy.deepcopy(draft.model)
    backend = TransformersBackend(policy, draft.processor, judge=draft.judge)
    pad = draft.tokenizer.pad_token_id
    puzzle = make_puzzle(9)
    anchor = trajectory_sample(
        TransformersDraft(backend), RolloutPrompt(puzzle.image, puzzle.question.text(), puzzle.steps())
    )
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    with pytest.raises(ValueError, match="needs rollout samples"):
        sapo_update(policy, policy, opt, [], pad_id=pad, clip_eps=0.2, kl_beta=0.0, anchors=[anchor], anchor=0.0)
    before = total_logprob(policy, anchor, pad)
    stats = sapo_update(policy, policy, opt, [], pad_id=pad, clip_eps=0.2, kl_beta=0.0, anchors=[anchor], anchor=1.0)
    after = total_logprob(policy, anchor, pad)
    assert after > before
    # the logged term is the mean NLL per token of the trajectory, before the step
    assert stats["anchor_nll"] == pytest.approx(-before / len(anchor.step_ids), rel=1e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"anchor": 5.0}, "both a weight"),
        ({"anchor_puzzles": 8}, "both a weight"),
        ({"anchor": -1.0, "anchor_puzzles": 8}, "must not be negative"),
        ({"groups_per_step": 0}, "needs rollout groups"),
        ({"warmup": 10, "decay": 10}, "after the warm-up"),
        ({"decay": -1}, "after the warm-up"),
    ],
)
def test_sapo_config_rejects_updates_that_would_train_nothing_or_silently_skip_a_term(
    options: dict[str, float], message: str
) -> None:
    from dreamr_stream.sapo.config import SapoConfig

    with pytest.raises(ValueError, match=message):
        SapoConfig(**options)  # type: ignore[arg-type]
    SapoConfig(groups_per_step=0, anchor=5.0, anchor_puzzles=16)  # the anchor alone is an update


def test_learning_rate_warms_up_then_stays_or_falls_on_a_cosine() -> None:
    from dreamr_stream.sapo.config import SapoConfig, lr_at

    flat = SapoConfig(lr=1e-3, warmup=4)
    assert [lr_at(flat, s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    cosine = SapoConfig(lr=1e-3, warmup=4, decay=14)
    rates = [lr_at(cosine, s) for s in range(20)]
    assert rates[:4] == pytest.approx([lr_at(flat, s) for s in range(4)])  # the same warm-up
    assert rates[3] == pytest.approx(1e-3) and rates[8] == pytest.approx(5e-4)  # peak, then half way down
    assert all(a > b for a, b in itertools.pairwise(rates[3:14]))  # falling all the way
    assert rates[13:] == pytest.approx([0.0] * 7)  # at update `decay` it is 0 and stays there
