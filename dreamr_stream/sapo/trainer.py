"""SAPO training loop: rollouts -> rewards -> group advantages -> clipped update with KL.

Why a compact loop and not TRL's GRPOTrainer: GRPOTrainer samples whole completions with
``generate`` and hands reward functions the completion text. SAPO samples ONE reasoning step at
a prefix of the target's trajectory, and its reward comes from the target model scoring that
step on the same image in one KV-cached forward (TBVM). Fitting that into GRPOTrainer means
custom step stopping, an image-aware reward callable holding a second model, and accelerate
for a single-process CPU loop; the loop below is ~150 lines and uses the engine's own backend
for both models, so what is trained is exactly what FPSR runs. It reaches the draft only through
``draft.DraftPolicy`` (here ``TransformersDraft``) and the target through ``rollouts.StepScorer``
(``TransformersScorer``) and the engine's backend calls.

Prompts are the caller's (``sapo.prompts``): the rollout groups are drawn from ``train``, the
draft is validated on ``val``, both from the same source (a task's puzzles, or a log split by
``held_out``).

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
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import IO

import torch

from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.backends.registry import capabilities_of
from dreamr_stream.config import VerificationConfig
from dreamr_stream.jsonl import open_append, read_jsonl
from dreamr_stream.sapo.acceptance import acceptance_at_prefixes
from dreamr_stream.sapo.config import SapoConfig, lr_at
from dreamr_stream.sapo.draft import DraftPolicy, TransformersDraft
from dreamr_stream.sapo.policy import PolicySample, gather_steps, sapo_loss, step_distributions, step_logprobs
from dreamr_stream.sapo.prompts import PromptSource, TrajectoryCache
from dreamr_stream.sapo.rollouts import RolloutPrompt, StepScorer, TransformersScorer, rollout_group, trajectory_sample
from dreamr_stream.sapo.trajectories import greedy_matches
from dreamr_stream.training import load_checkpoint, save_atomic, save_folder_atomic
from dreamr_stream.verify import Verifier, make_verifier

__all__ = ["sapo_update", "train"]

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
    # the loss of this update's settings: only the policy's distributions change between epochs
    loss_of = partial(
        sapo_loss,
        clip_eps=clip_eps,
        kl_beta=kl_beta,
        distill=distill,
        token_mean=token_mean,
        clip_off_policy=clip_off_policy,
    )
    policy.train()
    rec = dict(_NO_UPDATE)
    for _ in range(inner_epochs):
        loss = torch.zeros(())
        if samples:
            dists = step_distributions(policy, samples, pad_id)
            loss, stats = loss_of(gather_steps(dists, samples), samples, dists=dists)
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


def _plot(log_path: Path, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional (the `plot` extra)
        return
    rows = read_jsonl(log_path)
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


def _draw(prompts: Sequence[RolloutPrompt], rng: random.Random) -> RolloutPrompt:
    return prompts[rng.randrange(len(prompts))]


def _draw_missed(
    cfg: SapoConfig, prompts: Sequence[RolloutPrompt], draft: DraftPolicy, rng: random.Random, tries: int = 8
) -> tuple[RolloutPrompt, int] | None:
    """A prompt and a prefix where the draft's greedy step is not the target's (where TBVM
    rejects it, nearly always: a step one token off is below the likelihood threshold there),
    checked on the current draft with one teacher-forced forward per drawn trajectory."""
    for _ in range(tries):
        prompt = _draw(prompts, rng)
        matches = greedy_matches(draft, prompt.image, prompt.question, prompt.steps, gen=cfg.generation)
        missed = [k for k, same in enumerate(matches) if k >= prompt.start and not same]
        if missed:
            return prompt, rng.choice(missed)
    return None


def _draw_prefix(
    cfg: SapoConfig, prompts: Sequence[RolloutPrompt], draft: DraftPolicy, rng: random.Random
) -> tuple[RolloutPrompt, int]:
    """Where the next group is drawn: a missed prefix (a ``focus`` share of the time, where one
    is found), else a prompt and a prefix drawn uniformly."""
    drawn = _draw_missed(cfg, prompts, draft, rng) if rng.random() < cfg.focus else None
    if drawn is not None:
        return drawn
    prompt = _draw(prompts, rng)
    return prompt, rng.randrange(prompt.start, len(prompt.steps))


def _draw_groups(
    cfg: SapoConfig,
    prompts: Sequence[RolloutPrompt],
    target: StepScorer,
    draft: DraftPolicy,
    verifier: Verifier,
    rng: random.Random,
) -> tuple[list[PolicySample], int]:
    """An update's samples, and how many groups were drawn for them.

    An all-equal group carries no signal (every advantage is 0): groups are drawn until the
    update holds ``groups_per_step`` informative ones, so its signal does not shrink as the draft
    improves (at most ``max_tries`` times as many)."""
    samples: list[PolicySample] = []
    informative = tries = 0
    while informative < cfg.groups_per_step and tries < cfg.max_tries * cfg.groups_per_step:
        tries += 1
        prompt, k = _draw_prefix(cfg, prompts, draft, rng)
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
            gen=cfg.generation,
        )
        if any(abs(s.advantage) > 1e-6 for s in group):
            samples += group
            informative += 1
    return samples, tries


def _update(
    cfg: SapoConfig,
    policy: torch.nn.Module,
    ref: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    samples: list[PolicySample],
    anchors: list[PolicySample],
    pad_id: int,
) -> dict[str, float]:
    """``sapo_update`` with the run's settings; the empty statistics when there is nothing to train."""
    if not (samples or anchors):
        return dict(_NO_UPDATE)
    return sapo_update(
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


def _sample_means(samples: list[PolicySample]) -> dict[str, float]:
    """Mean reward, agreement and length of the draft's own samples (the guides left out)."""
    metas = [s.meta for s in samples if not s.meta.get("guide")] or [{"reward": 0.0, "tokens": 0, "agree": False}]
    return {
        "reward": sum(m["reward"] for m in metas) / len(metas),
        "agree": sum(m["agree"] for m in metas) / len(metas),
        "tokens": sum(m["tokens"] for m in metas) / len(metas),
    }


def _load(cfg: SapoConfig, target_dir: Path, draft_dir: Path) -> tuple[TransformersBackend, DraftPolicy, Verifier]:
    """The two models, and TBVM as the target recommends it with the run's overrides on top
    (``VerificationConfig.recommended``, as every entry point that loads a model folder: a mode
    alone takes that mode's measured tau)."""
    target = TransformersBackend.from_pretrained(target_dir, device="cpu", name="target")
    draft = TransformersDraft(TransformersBackend.from_pretrained(draft_dir, device="cpu", name="draft"))
    recommendation = capabilities_of(target).recommended_verification
    verification = VerificationConfig.recommended(recommendation, mode=cfg.verify_mode or None, tau=cfg.tau)
    return target, draft, make_verifier(verification)


def _reference(policy: torch.nn.Module) -> torch.nn.Module:
    """The starting draft, frozen: the KL term's reference."""
    ref = copy.deepcopy(policy).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _optimizer(cfg: SapoConfig, policy: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW on what SAPO trains: the language model, and the vision side only with ``train_vision``."""
    for name, p in policy.named_parameters():
        if not cfg.train_vision and ("vision_tower" in name or "multi_modal_projector" in name):
            p.requires_grad_(False)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)


def _resume(ckpt: Path, policy: torch.nn.Module, optimizer: torch.optim.Optimizer, rng: random.Random) -> int:
    """The updates done: restored from ``ckpt`` if a run saved one there, else 0."""
    if not (ckpt / "state.pt").exists():
        return 0
    state = load_checkpoint(ckpt / "state.pt")
    policy.load_state_dict(state["policy"])
    optimizer.load_state_dict(state["opt"])
    rng.setstate(state["rng"])
    log.info("resumed SAPO at update %d", state["step"])
    return int(state["step"])


def _save(ckpt: Path, policy: torch.nn.Module, optimizer: torch.optim.Optimizer, rng: random.Random, done: int) -> None:
    ckpt.mkdir(exist_ok=True)
    state = {"policy": policy.state_dict(), "opt": optimizer.state_dict(), "rng": rng.getstate(), "step": done}
    save_atomic(state, ckpt / "state.pt")


def _write(logf: IO[str], rec: dict[str, float]) -> None:
    logf.write(json.dumps(rec) + "\n")
    logf.flush()


def train(cfg: SapoConfig, target_dir: Path, draft_dir: Path, out: Path, prompts: PromptSource) -> Path:
    """Train the draft in ``draft_dir`` towards the target in ``target_dir`` on the prompts of
    ``prompts`` (resuming a run in ``out``); the folder of the trained draft."""
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    target, draft, verifier = _load(cfg, target_dir, draft_dir)
    policy = draft.module
    ref = _reference(policy)
    optimizer = _optimizer(cfg, policy)
    rng = random.Random(cfg.seed)
    ckpt = out / "checkpoint"
    start = _resume(ckpt, policy, optimizer, rng)
    source = prompts(target, TrajectoryCache(out / "trajectories.jsonl"))
    val = list(source.val)
    pad_id = draft.pad_id
    scorer = TransformersScorer(target, cfg.generation)

    def evaluate(done: int) -> None:
        ev = {"step": done, **acceptance_at_prefixes(target, draft, val, verifier, gen=cfg.generation)}
        _write(logf, ev)
        log.info("SAPO eval %s", ev)

    logf = open_append(out / "log.jsonl")
    if start == 0:
        evaluate(0)
    for step in range(start, cfg.steps):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(cfg, step)
        t0 = time.perf_counter()
        samples, tries = _draw_groups(cfg, source.train, scorer, draft, verifier, rng)
        # SapoConfig keeps anchor_puzzles at 0 unless the anchor has a weight
        anchors = [
            trajectory_sample(draft, _draw(source.train, rng), gen=cfg.generation) for _ in range(cfg.anchor_puzzles)
        ]
        rec: dict[str, float] = {"step": step + 1, "lr": optimizer.param_groups[0]["lr"]}
        rec |= _update(cfg, policy, ref, optimizer, samples, anchors, pad_id)
        rec |= _sample_means(samples) | {"samples": len(samples), "groups_tried": tries, "s": time.perf_counter() - t0}
        _write(logf, rec)
        _show(rec, cfg.steps)
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            evaluate(done)
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            _save(ckpt, policy, optimizer, rng, done)
    final = save_folder_atomic(draft.save, out / "final")
    _plot(out / "log.jsonl", out / "curves.png")
    return final


def _show(rec: dict[str, float], steps: int) -> None:
    """The update's progress on a terminal; nothing in a background run (the log has it all)."""
    if sys.stderr.isatty():
        line = f"\rSAPO update {rec['step']}/{steps} reward {rec['reward']:.3f} kl {rec['kl']:.4f}"
        print(line, end="", file=sys.stderr)
