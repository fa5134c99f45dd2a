"""The trajectory cache as one request sees it: its key, its cached steps, its log, its store.

A finished trajectory is kept under a key of (the target's and the draft's identities, the
verification settings, the decoded image, the normalised question); an identical request later
takes its steps as free drafts (``engine.request_policy`` decides how they are replayed: each
judged by TBVM in one target forward, or with ``trust`` yielded as they are). Every verification
is logged for SAPO (``LogEntry``), and a rejected step's log entry gets the target's own step.
The stores themselves (protocol, in-memory, guarded, key helpers) are ``dreamr_stream.store``;
a slow or failing store is a miss there, never a broken request.

A store is shared (a Redis that replicas and other programs can write), so a hit is checked
before it is used: its image digest and question must be this request's, and its steps no more
and no longer than this request could have written (at most ``max_steps`` steps, each of at most
``max_step_tokens * CHARS_PER_TOKEN`` characters). Anything else is a miss with a warning.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio

from dreamr_stream.config import JudgeTemplate, ReasonerConfig, VerificationConfig
from dreamr_stream.engine.runner import ModelRunner
from dreamr_stream.store import (
    GuardedStore,
    LogEntry,
    Trajectory,
    image_digest,
    normalise_question,
    settings_fingerprint,
    stored_image,
    trajectory_key,
)
from dreamr_stream.types import StepSource, Verdict

__all__ = ["CHARS_PER_TOKEN", "CacheContext", "cache_key", "open_cache"]

log = logging.getLogger(__name__)

#: Characters a token may stand for, when bounding a cached step by ``max_step_tokens``: generous
#: (BPE tokens average about four), so that no honest trajectory is refused.
CHARS_PER_TOKEN = 16


def cache_key(
    target: str, draft: str, verification: VerificationConfig, judge: JudgeTemplate, image: str, question: str
) -> str:
    """The key of a trajectory: ``target`` / ``draft`` are the models' identities, ``judge``
    the template the target judges with (the configured one, else its own), ``image`` the
    decoded image's digest."""
    verifier = verification.model_dump(mode="json")
    verifier["judge"] = judge.model_dump()
    return trajectory_key(settings_fingerprint(target, draft, verifier), image, question)


class CacheContext:
    """A request's view of the trajectory store: where its trajectory lives, what it logs."""

    def __init__(
        self,
        store: GuardedStore,
        *,
        key: str,
        image: str,
        pil: Any,
        question: str,
        max_steps: int,
        max_step_chars: int,
        trust: bool,
        log: bool,
        timeout_s: float,
    ) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.key = key
        self.image = image
        self.pil = pil  # encoded (scaled down) only when a trajectory is stored
        self.question = question
        self.max_steps = max_steps
        self.max_step_chars = max_step_chars
        self.trust = trust
        self.log = log
        self.entries: list[LogEntry] = []
        self.steps: list[str] = []  # a hit's cached steps

    async def lookup(self) -> list[str] | None:
        """The cached steps of this request's trajectory (kept as ``steps``), or None: a miss
        (nothing stored, or a stored value that is not this request's: see the module)."""
        hit = await self.store.get(self.key, timeout_s=self.timeout_s)
        wrong = self.mismatch(hit) if hit is not None else None
        if wrong is not None:
            log.warning("the trajectory store's value under %s is ignored: %s", self.key, wrong)
        self.steps = list(hit.steps) if hit is not None and wrong is None else []
        return self.steps or None

    def mismatch(self, hit: Trajectory) -> str | None:
        """Why ``hit`` cannot be this request's trajectory (None: it can)."""
        if hit.image != self.image:
            return "its image digest is another image's"
        if normalise_question(hit.question) != normalise_question(self.question):
            return "its question is another question"
        if len(hit.steps) > self.max_steps:
            return f"{len(hit.steps)} steps, over max_steps={self.max_steps}"
        longest = max((len(step) for step in hit.steps), default=0)
        if longest > self.max_step_chars:
            return f"a step of {longest} characters, over {self.max_step_chars}"
        return None

    async def store_trajectory(self, steps: list[str]) -> None:
        """Keep a finished trajectory (its last step final) for the next identical request.

        Its image goes with it, scaled down to what the models read: SAPO rebuilds prompts from it.
        """
        png = await anyio.to_thread.run_sync(stored_image, self.pil)
        trajectory = Trajectory(steps=steps, image=self.image, question=self.question)
        await self.store.put(self.key, trajectory, png, timeout_s=self.timeout_s)

    # ------------------------------------------------------------------ the verification log
    def log_verdict(self, verdict: Verdict, *, index: int, prefix: list[str], text: str, source: StepSource) -> None:
        """Log one verification (when this request logs): step ``index`` after ``prefix``."""
        if not self.log:
            return
        self.entries.append(
            LogEntry(
                key=self.key,
                image=self.image,
                question=self.question,
                index=index,
                prefix=prefix,
                draft=text,
                verdict=verdict,
                source=source.value,
            )
        )

    def log_target_step(self, index: int, text: str) -> None:
        """The target's own step ``index`` replaced a rejected draft: its log entry gets it."""
        if self.entries and self.entries[-1].index == index:
            self.entries[-1] = self.entries[-1].model_copy(update={"target_step": text})

    async def flush_log(self) -> None:
        """Append the logged verifications to the store, also from a cancelled request."""
        if not self.entries:
            return
        with anyio.CancelScope(shield=True):  # a cancelled request still logs what it verified
            await self.store.append_log(self.entries, timeout_s=self.timeout_s)
        self.entries = []


async def open_cache(
    config: ReasonerConfig, store: GuardedStore, target: ModelRunner, draft: ModelRunner, image: Any, question: str
) -> CacheContext | None:
    """The cache of one request for ``question`` on ``image`` (None: caching is off)."""
    if not config.cache.enabled:
        return None
    digest = await anyio.to_thread.run_sync(image_digest, image)
    judge = config.verification.judge or target.backend.judge
    key = cache_key(
        target.capabilities.identity, draft.capabilities.identity, config.verification, judge, digest, question
    )
    return CacheContext(
        store,
        timeout_s=config.cache.timeout_s,
        key=key,
        image=digest,
        pil=image,
        question=question,
        max_steps=config.generation.max_steps,
        max_step_chars=config.generation.max_step_tokens * CHARS_PER_TOKEN,
        trust=config.cache.trust,
        log=config.cache.log,
    )
