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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["PolicySample", "UpdateStats", "batch_inputs", "sapo_loss", "step_logprobs"]


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
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class UpdateStats:
    loss: float
    kl: float
    clip_fraction: float


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


def step_logprobs(model: torch.nn.Module, samples: list[PolicySample], pad_id: int) -> list[torch.Tensor]:
    """log pi(step token | prompt, prefix, earlier step tokens) for each sample, batched."""
    seqs = [s.prompt["input_ids"][0].tolist() + s.context_ids + s.step_ids for s in samples]
    device = next(model.parameters()).device
    logits = model(**batch_inputs([s.prompt for s in samples], seqs, pad_id, device)).logits  # (B, T, V)
    out = []
    for b, s in enumerate(samples):
        start = len(seqs[b]) - len(s.step_ids)  # position of the first step token
        # logits at t predict token t+1: (n_step, V)
        step_logits = logits[b, start - 1 : len(seqs[b]) - 1].float()
        target = torch.tensor(s.step_ids, device=device)[:, None]
        out.append(torch.log_softmax(step_logits, dim=-1).gather(1, target)[:, 0])
    return out


def sapo_loss(
    new: list[torch.Tensor], samples: list[PolicySample], *, clip_eps: float = 0.2, kl_beta: float = 0.05
) -> tuple[torch.Tensor, UpdateStats]:
    per_sample, kls, clipped, count = [], [], 0, 0
    for lp, s in zip(new, samples, strict=True):
        assert s.old_logprobs is not None and s.ref_logprobs is not None
        ratio = torch.exp(lp - s.old_logprobs)
        adv = torch.tensor(s.advantage, dtype=lp.dtype)
        surr = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
        diff = s.ref_logprobs - lp
        kl = torch.exp(diff) - diff - 1
        n = len(lp) if s.credit is None else max(1, min(len(lp), s.credit))
        per_sample.append(-(surr[:n] - kl_beta * kl[:n]).mean())
        kls.append(kl.mean().detach())
        clipped += int(((ratio < 1 - clip_eps) | (ratio > 1 + clip_eps)).sum())
        count += ratio.numel()
    loss = torch.stack(per_sample).mean()
    return loss, UpdateStats(
        loss=float(loss.detach()), kl=float(torch.stack(kls).mean()), clip_fraction=clipped / max(1, count)
    )
