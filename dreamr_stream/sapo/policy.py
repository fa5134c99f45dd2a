"""The SAPO policy update: clipped policy ratio on the sampled step's tokens, KL to the start.

For sample ``i`` (a draft step with group advantage ``A_i``) and its tokens ``y_t``::

    rho_t   = exp(log pi(y_t) - log pi_old(y_t))                 policy ratio vs the sampler
    surr_t  = min(rho_t * A_i, clip(rho_t, 1 - eps, 1 + eps) * A_i)
    kl_t    = exp(log pi_ref(y_t) - log pi(y_t)) - (log pi_ref(y_t) - log pi(y_t)) - 1
    loss    = - mean_i mean_{t <= e_i} (surr_t - beta * kl_t)

where ``e_i`` is the sample's first token the target rejects (its probability under the target
is below the TBVM likelihood threshold ``tau / (1 + tau)``), or its last token. Why: a step's
reward is one number for the whole step, but a misread cell is one token; pushing down every
token of a rejected step would also push down the correct readings written after the error
(we saw acceptance fall while training on whole steps). Before the error the samples of a
group share their context, so their advantages cancel there; after it there is no credit.

(k3 KL estimator, always >= 0, to the starting SFT draft ``pi_ref``). Only the step's tokens are
trained; the prompt and the verified prefix are context.

Token mean (``token_mean``, as DAPO and Dr. GRPO argue): replace ``mean_i mean_{t <= e_i}`` by
one mean over all credited tokens of the batch. Why here: the samples of a group share their
context up to the error, so a wrong sample credited on its 10 tokens up to a miscount and the
target's step credited on all its 50 write the same first tokens with opposite advantages; per
sample means weigh the wrong sample's copy of those (correct) tokens 5x more, and the update
pushes correct readings down. Per token, the shared tokens' advantages cancel as they should.

Off-policy samples (the target's own step, which guided groups add) take ``surr_t = rho_t * A_i``
unclipped, as in LUFFY: the clip exists to keep an update near the policy that sampled, and
this step was not sampled by the draft. With the clip, a target step the draft finds unlikely
(say 1e-3) can gain only about 20% of probability per update, however often it wins its group.

Dense faithfulness (``distill > 0``): the same target forward that scores a step also gives the
target's whole next-token distribution ``q_t`` at each of its positions, and the loss adds::

    loss += distill * mean_i mean_{t <= e_i} KL(q_t || pi(. | y_<t))

on the draft's own samples (on-policy distillation, as in GKD). Why: TBVM's likelihood mode
rejects a step at its first token below ``tau / (1 + tau)``, a decision about one token, while
the step reward is one number per step; ``q_t`` says at that very token which one the target
would have accepted, for all 396 words at once, where the group advantage only says "this step
was worse than its siblings". It is the step reward's faithfulness term made per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "PolicySample",
    "UpdateStats",
    "batch_inputs",
    "gather_steps",
    "sapo_loss",
    "step_distributions",
    "step_logprobs",
]


@dataclass
class PolicySample:
    prompt: dict[str, Any]  # processor tensors of the prompt (batch dim 1), incl. input_ids
    context_ids: list[int]  # the verified prefix after the prompt: conditioning only
    step_ids: list[int]  # the sampled step + delimiter: what the update trains
    advantage: float = 0.0
    # leading step tokens that take the advantage (None: all). Credit stops at the first token
    # the target rejects: what follows it was written in a context that is already wrong.
    credit: int | None = None
    old_logprobs: torch.Tensor | None = None  # (len(step_ids),)
    ref_logprobs: torch.Tensor | None = None
    # the target's next-token log-probs at each step position, (len(step_ids), V); None: no
    # dense term (the two tokenisations do not line up, or judge-only evidence)
    teacher: torch.Tensor | None = None
    # written by another policy (the target's guide step); ``clip_off_policy`` says whether
    # its ratio is clipped
    off_policy: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class UpdateStats:
    loss: float
    kl: float
    clip_fraction: float
    distill: float = 0.0  # mean KL(target || draft) per credited token


def batch_inputs(
    prompts: list[dict[str, Any]], rows: list[list[int]], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Model inputs for token rows (right-padded, with their mask), row ``b`` continuing
    ``prompts[b]``, whose image tensors are stacked alongside."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, device=device)
        mask[b, : len(r)] = 1
    extra = {
        k: torch.cat([p[k] for p in prompts]).to(device)
        for k in prompts[0]
        if k not in ("input_ids", "attention_mask") and isinstance(prompts[0][k], torch.Tensor)
    }
    return {"input_ids": ids, "attention_mask": mask, **extra}


def step_distributions(model: torch.nn.Module, samples: list[PolicySample], pad_id: int) -> list[torch.Tensor]:
    """log pi(. | prompt, prefix, earlier step tokens) at each step position, (n_step, V) per
    sample, batched."""
    seqs = [s.prompt["input_ids"][0].tolist() + s.context_ids + s.step_ids for s in samples]
    device = next(model.parameters()).device
    logits = model(**batch_inputs([s.prompt for s in samples], seqs, pad_id, device)).logits  # (B, T, V)
    out = []
    for b, s in enumerate(samples):
        start = len(seqs[b]) - len(s.step_ids)  # position of the first step token
        # logits at t predict token t+1: (n_step, V)
        out.append(torch.log_softmax(logits[b, start - 1 : len(seqs[b]) - 1].float(), dim=-1))
    return out


def gather_steps(dists: list[torch.Tensor], samples: list[PolicySample]) -> list[torch.Tensor]:
    """Each sample's own tokens' log-probs out of its step distributions."""
    return [
        d.gather(1, torch.tensor(s.step_ids, device=d.device)[:, None])[:, 0]
        for d, s in zip(dists, samples, strict=True)
    ]


def step_logprobs(model: torch.nn.Module, samples: list[PolicySample], pad_id: int) -> list[torch.Tensor]:
    """log pi(step token | prompt, prefix, earlier step tokens) for each sample, batched."""
    return gather_steps(step_distributions(model, samples, pad_id), samples)


def sapo_loss(
    new: list[torch.Tensor],
    samples: list[PolicySample],
    *,
    clip_eps: float = 0.2,
    kl_beta: float = 0.05,
    distill: float = 0.0,
    dists: list[torch.Tensor] | None = None,
    token_mean: bool = False,
    clip_off_policy: bool = True,
) -> tuple[torch.Tensor, UpdateStats]:
    """The loss of the module docstring; ``dists`` (the policy's step distributions) are needed
    only for the dense term (``distill > 0`` and samples with a ``teacher``). ``token_mean``
    averages over all credited tokens of the batch instead of per sample, then over samples.
    ``clip_off_policy=False`` trains off-policy samples on the unclipped ratio."""
    per_sample, kls, teach, clipped, count = [], [], [], 0, 0
    weights: list[int] = []
    for i, (lp, s) in enumerate(zip(new, samples, strict=True)):
        assert s.old_logprobs is not None and s.ref_logprobs is not None
        ratio = torch.exp(lp - s.old_logprobs)
        adv = torch.tensor(s.advantage, dtype=lp.dtype)
        if s.off_policy and not clip_off_policy:
            surr = ratio * adv
        else:
            surr = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
        diff = s.ref_logprobs - lp
        kl = torch.exp(diff) - diff - 1
        n = len(lp) if s.credit is None else max(1, min(len(lp), s.credit))
        term = -(surr[:n] - kl_beta * kl[:n]).mean()
        weights.append(n)
        if distill > 0 and s.teacher is not None:
            if dists is None:
                raise ValueError("the dense term needs the policy's step distributions (dists)")
            q = s.teacher[:n]
            fwd = (q.exp() * (q - dists[i][:n])).sum(-1).mean()
            term = term + distill * fwd
            teach.append(fwd.detach())
        per_sample.append(term)
        kls.append(kl.mean().detach())
        clipped += int(((ratio < 1 - clip_eps) | (ratio > 1 + clip_eps)).sum())
        count += ratio.numel()
    terms = torch.stack(per_sample)
    if token_mean:  # each sample's mean weighted by its credited tokens: a mean over tokens
        loss = (terms * torch.tensor(weights, dtype=terms.dtype)).sum() / sum(weights)
    else:
        loss = terms.mean()
    return loss, UpdateStats(
        loss=float(loss.detach()),
        kl=float(torch.stack(kls).mean()),
        clip_fraction=clipped / max(1, count),
        distill=float(torch.stack(teach).mean()) if teach else 0.0,
    )
