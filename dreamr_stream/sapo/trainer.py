"""SAPO training loop: rollouts -> rewards -> group advantages -> clipped update with KL.

Why a compact loop and not TRL's GRPOTrainer: GRPOTrainer samples whole completions with
``generate`` and hands reward functions the completion text. SAPO samples ONE reasoning step at
a prefix of the target's trajectory, and its reward comes from the target model scoring that
step on the same image in one KV-cached forward (TBVM). Fitting that into GRPOTrainer means
custom step stopping, an image-aware reward callable holding a second model, and accelerate
for a single-process CPU loop; the loop below is ~150 lines and uses the engine's own backend
for both models, so what is trained is exactly what FPSR runs.

Resumable: ``<out>/checkpoint`` (policy + optimiser + rng + step) every ``ckpt_every`` updates;
``<out>/log.jsonl`` one line per update and per evaluation; ``<out>/curves.png`` at the end.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.config import VerificationConfig
from dreamr_stream.sapo.config import SapoConfig, lr_at
from dreamr_stream.sapo.policy import PolicySample, gather_steps, sapo_loss, step_distributions, step_logprobs
from dreamr_stream.sapo.rollouts import (
    RolloutPrompt,
    TrajectoryCache,
    greedy_matches,
    greedy_writes,
    rollout_group,
    target_trajectory,
    trajectory_sample,
)
from dreamr_stream.verify import Verifier, make_verifier
from dreamr_stream.zoo.task import Puzzle, Split, make_puzzle, split_seed

__all__ = [
    "PrefixVerdict",
    "acceptance_at_prefixes",
    "greedy_verdicts",
    "sapo_update",
    "task_prompt",
    "task_prompts",
    "train",
]

log = logging.getLogger(__name__)
# an update's logged statistics before any loss is computed (and for an update that had none)
_NO_UPDATE: dict[str, float] = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "distill": 0.0}


def sapo_update(
    policy: torch.nn.Module,
    ref: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    samples: list[PolicySample],
    *,
    pad_id: int,
    clip_eps: float,
    kl_beta: float,
    inner_epochs: int = 1,
    max_grad_norm: float = 1.0,
    distill: float = 0.0,
    token_mean: bool = False,
    clip_off_policy: bool = True,
    anchors: Sequence[PolicySample] = (),
    anchor: float = 0.0,
) -> dict[str, float]:
    """One SAPO update on a batch of scored samples (old and reference log-probs filled here).

    ``anchors`` (target trajectories, ``rollouts.trajectory_sample``) add ``anchor`` times their
    mean negative log-likelihood per token to the loss: the supervised term of ``SapoConfig.anchor``.
    Either list may be empty, not both."""
    if not samples and not (anchors and anchor > 0):
        raise ValueError("an update needs rollout samples or anchored trajectories")
    policy.eval()
    if samples:
        with torch.no_grad():
            for s, old, r in zip(
                samples, step_logprobs(policy, samples, pad_id), step_logprobs(ref, samples, pad_id), strict=True
            ):
                s.old_logprobs, s.ref_logprobs = old, r
    policy.train()
    rec = dict(_NO_UPDATE)
    for _ in range(inner_epochs):
        loss = torch.zeros(())
        if samples:
            dists = step_distributions(policy, samples, pad_id)
            loss, stats = sapo_loss(
                gather_steps(dists, samples),
                samples,
                clip_eps=clip_eps,
                kl_beta=kl_beta,
                distill=distill,
                dists=dists,
                token_mean=token_mean,
                clip_off_policy=clip_off_policy,
            )
            rec = asdict(stats)
        if anchors and anchor > 0:
            nll = -torch.cat(step_logprobs(policy, list(anchors), pad_id)).mean()
            loss = loss + anchor * nll
            rec["anchor_nll"] = float(nll.detach())
        rec["loss"] = float(loss.detach())  # the whole loss, the anchor term included
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
        optimizer.step()
    policy.eval()
    return rec


@dataclass(frozen=True)
class PrefixVerdict:
    """The draft's greedy step at one prefix of a target trajectory, as TBVM judged it."""

    prompt: int  # index into the prompts judged
    k: int  # steps of the target's trajectory before it
    accepted: bool
    tokens: int


@torch.no_grad()
def greedy_verdicts(
    target: TransformersBackend, draft: TransformersBackend, prompts: list[RolloutPrompt], verifier: Verifier
) -> list[PrefixVerdict]:
    """TBVM's verdict on the draft's greedy step at every prefix of the target's trajectories
    (the prefix FPSR verifies against), through the engine's own backend calls."""
    out = []
    for i, p in enumerate(prompts):
        for k in range(p.start, len(p.steps)):
            ds = draft.open_session(p.image, p.question)
            ts = target.open_session(p.image, p.question)
            try:
                for step in p.steps[:k]:
                    draft.append(ds, step, stop="\n")
                    target.append(ts, step, stop="\n")
                step_out = draft.generate_step(ds, max_tokens=64, stop="\n")
                score = target.score(ts, step_out.text, stop="\n", judge=target.judge if verifier.needs_judge else None)
            finally:
                draft.close(ds)
                target.close(ts)
            verdict = verifier.verify(score.p_pos, score.p_neg, score.token_logprobs)
            out.append(PrefixVerdict(i, k, verdict.accepted, len(draft.encode(step_out.text))))
    return out


def acceptance_at_prefixes(
    target: TransformersBackend, draft: TransformersBackend, prompts: list[RolloutPrompt], verifier: Verifier
) -> dict[str, float]:
    """TBVM acceptance of the draft's greedy step at every prefix of the target's trajectories,
    and where the draft's step length comes from. Lengths are in tokens, means over all judged
    prefixes, so that::

        step_tokens = target_step_tokens + excess_tokens - shortfall_tokens

    ``excess_tokens`` is what the reward's conciseness term penalises (tokens beyond the
    target's step), ``shortfall_tokens`` what the draft leaves out of it; ``accepted_*`` are
    the same means over the accepted steps alone, against the target's steps there."""
    vs = greedy_verdicts(target, draft, prompts, verifier)
    n = max(1, len(vs))
    # the target's own step at the same prefixes, in the draft's tokens: the length to match
    targets = [len(draft.encode(prompts[v.prompt].steps[v.k])) for v in vs]
    pairs = list(zip(vs, targets, strict=True))
    accepted = [(v, t) for v, t in pairs if v.accepted]
    m = max(1, len(accepted))
    return {
        "acceptance": len(accepted) / n,
        "step_tokens": sum(v.tokens for v in vs) / n,
        "target_step_tokens": sum(targets) / n,
        "excess_tokens": sum(max(0, v.tokens - t) for v, t in pairs) / n,
        "shortfall_tokens": sum(max(0, t - v.tokens) for v, t in pairs) / n,
        "accepted_step_tokens": sum(v.tokens for v, _ in accepted) / m,
        "accepted_target_step_tokens": sum(t for _, t in accepted) / m,
        "judged": len(vs),
    }


class _Pool:
    """Rollout prompts drawn at random: the task's train split (``size`` puzzles, each target
    trajectory computed on first draw and cached on disk) or a fixed list (logged prompts)."""

    def __init__(
        self, target: TransformersBackend, cache: TrajectoryCache, size: int, fixed: list[RolloutPrompt] | None
    ) -> None:
        self.target, self.cache = target, cache
        self.size = len(fixed) if fixed else size
        self.prompts: dict[int, RolloutPrompt] = dict(enumerate(fixed or []))

    def draw(self, rng: random.Random) -> RolloutPrompt:
        i = rng.randrange(self.size)
        if i not in self.prompts:
            self.prompts[i] = task_prompt(self.target, self.cache, "train", i)
        return self.prompts[i]


def _draw_missed(
    pool: _Pool, draft: TransformersBackend, rng: random.Random, tries: int = 8
) -> tuple[RolloutPrompt, int] | None:
    """A prompt and a prefix where the draft's greedy step is not the target's (where TBVM
    rejects it, nearly always: a step one token off is below the likelihood threshold there),
    checked on the current draft with one teacher-forced forward per drawn trajectory."""
    for _ in range(tries):
        prompt = pool.draw(rng)
        matches = greedy_matches(draft, prompt.image, prompt.question, prompt.steps)
        missed = [k for k, same in enumerate(matches) if k >= prompt.start and not same]
        if missed:
            return prompt, rng.choice(missed)
    return None


def _trajectory(target: TransformersBackend, puzzle: Puzzle) -> list[str]:
    """The target's greedy trajectory: the reference solution where one forward shows the
    target writes exactly that, else decoded step by step."""
    image, question, reference = puzzle.image, puzzle.question.text(), puzzle.steps()
    if greedy_writes(target, image, question, reference):
        return reference
    return target_trajectory(target, image, question)


def task_prompt(target: TransformersBackend, cache: TrajectoryCache, split: Split, i: int) -> RolloutPrompt:
    """Puzzle ``i`` of a task split with the target's trajectory (from ``cache`` if there)."""
    puzzle = make_puzzle(split_seed(split, i), hard=split == "hard")
    key = f"{split}:{i}"
    steps = cache.get(key, partial(_trajectory, target, puzzle))
    return RolloutPrompt(puzzle.image, puzzle.question.text(), steps, key=key)


def task_prompts(
    target: TransformersBackend, cache: TrajectoryCache, split: Split, n: int, start: int = 0
) -> list[RolloutPrompt]:
    """Puzzles ``start .. start + n - 1`` of a task split with the target's trajectories."""
    return [task_prompt(target, cache, split, i) for i in range(start, start + n)]


def _plot(log_path: Path, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional (the `plot` extra)
        return
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    upd = [r for r in rows if "reward" in r]
    ev = [r for r in rows if "acceptance" in r]
    panels = [
        ("reward", upd, "reward"),
        ("eval acceptance", ev, "acceptance"),
        ("eval step tokens", ev, "step_tokens"),
        ("KL to SFT draft", upd, "kl"),
    ]
    if any(r.get("distill") for r in upd):  # the dense term ran
        panels.append(("KL(target || draft) per token", upd, "distill"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (name, data, key) in zip(axes, panels, strict=True):
        ax.plot([r["step"] for r in data], [r.get(key, 0.0) for r in data], marker="o" if data is ev else None)
        ax.set_title(name)
        ax.set_xlabel("update")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def train(
    cfg: SapoConfig, target_dir: Path, draft_dir: Path, out: Path, log_prompts: list[RolloutPrompt] | None = None
) -> Path:
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    target = TransformersBackend.from_pretrained(target_dir, device="cpu", name="target")
    draft = TransformersBackend.from_pretrained(draft_dir, device="cpu", name="draft")
    verification = VerificationConfig.recommended(
        target.recommended_verification, mode=cfg.verify_mode or None, tau=cfg.tau
    )
    verifier = make_verifier(verification)
    policy = draft.model
    ref = copy.deepcopy(policy).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    for name, p in policy.named_parameters():
        if not cfg.train_vision and ("vision_tower" in name or "multi_modal_projector" in name):
            p.requires_grad_(False)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    start = 0
    ckpt = out / "checkpoint"
    if (ckpt / "state.pt").exists():
        state = torch.load(ckpt / "state.pt", weights_only=False)
        policy.load_state_dict(state["policy"])
        optimizer.load_state_dict(state["opt"])
        rng.setstate(state["rng"])
        start = state["step"]
        log.info("resumed SAPO at update %d", start)
    cache = TrajectoryCache(out / "trajectories.jsonl")
    pool = _Pool(target, cache, cfg.pool, log_prompts)
    val = task_prompts(target, cache, "val", cfg.eval_prompts)
    pad_id = draft.tokenizer.pad_token_id or 0
    logf = (out / "log.jsonl").open("a")
    if start == 0:
        logf.write(json.dumps({"step": 0, **acceptance_at_prefixes(target, draft, val, verifier)}) + "\n")
        logf.flush()
    show = sys.stderr.isatty()
    for step in range(start, cfg.steps):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(cfg, step)
        t0 = time.perf_counter()
        samples: list[PolicySample] = []
        informative = tries = 0
        # an all-equal group carries no signal (every advantage is 0): draw until the update holds
        # groups_per_step informative groups, so its signal does not shrink as the draft improves
        while informative < cfg.groups_per_step and tries < cfg.max_tries * cfg.groups_per_step:
            tries += 1
            drawn = _draw_missed(pool, draft, rng) if rng.random() < cfg.focus else None
            if drawn is not None:
                prompt, k = drawn
            else:
                prompt = pool.draw(rng)
                k = rng.randrange(prompt.start, len(prompt.steps))
            group = rollout_group(
                target,
                draft,
                prompt,
                k,
                group_size=cfg.group_size,
                temperature=cfg.temperature,
                weights=cfg.weights,
                rng=rng,
                verifier=verifier,
                guide=cfg.guide,
                teach=cfg.distill > 0,
            )
            if any(abs(s.advantage) > 1e-6 for s in group):
                samples += group
                informative += 1
        # SapoConfig keeps anchor_puzzles at 0 unless the anchor has a weight
        anchors = [trajectory_sample(draft, pool.draw(rng)) for _ in range(cfg.anchor_puzzles)]
        # report the draft's own samples, not the guides
        metas = [s.meta for s in samples if not s.meta.get("guide")] or [{"reward": 0.0, "tokens": 0, "agree": False}]
        rec: dict[str, float] = {"step": step + 1, "lr": optimizer.param_groups[0]["lr"]}
        if samples or anchors:
            rec |= sapo_update(
                policy,
                ref,
                optimizer,
                samples,
                pad_id=pad_id,
                clip_eps=cfg.clip_eps,
                kl_beta=cfg.kl_beta,
                inner_epochs=cfg.inner_epochs,
                max_grad_norm=cfg.max_grad_norm,
                distill=cfg.distill,
                token_mean=cfg.token_mean,
                clip_off_policy=cfg.guide_clip,
                anchors=anchors,
                anchor=cfg.anchor,
            )
        else:
            rec |= _NO_UPDATE
        rec |= {
            "reward": sum(m["reward"] for m in metas) / len(metas),
            "agree": sum(m["agree"] for m in metas) / len(metas),
            "tokens": sum(m["tokens"] for m in metas) / len(metas),
            "samples": len(samples),
            "groups_tried": tries,
            "s": time.perf_counter() - t0,
        }
        logf.write(json.dumps(rec) + "\n")
        logf.flush()
        if show:
            print(
                f"\rSAPO update {step + 1}/{cfg.steps} reward {rec['reward']:.3f} kl {rec['kl']:.4f}",
                end="",
                file=sys.stderr,
            )
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            ev = {"step": done, **acceptance_at_prefixes(target, draft, val, verifier)}
            logf.write(json.dumps(ev) + "\n")
            logf.flush()
            log.info("SAPO eval %s", ev)
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            ckpt.mkdir(exist_ok=True)
            tmp = ckpt / "state.pt.tmp"
            torch.save(
                {"policy": policy.state_dict(), "opt": optimizer.state_dict(), "rng": rng.getstate(), "step": done}, tmp
            )
            tmp.replace(ckpt / "state.pt")
    final = out / "final"
    policy.save_pretrained(final)
    draft.processor.save_pretrained(final)
    _plot(out / "log.jsonl", out / "curves.png")
    return final
