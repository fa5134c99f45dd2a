"""Batched greedy decoding for ``TransformersBackend.generate_batch``: several sessions' steps,
one forward per token for all of them.

Each session owns a ``DynamicCache`` of its own length. For a batch their caches are left-padded
to one width and stacked, per layer (rows, heads, width, head_dim), with a 2-D attention mask
(0 over each row's padding) and per-row position ids (each row's own length), so that a row
attends to exactly its own tokens at its own positions. Every forward feeds one token per row
still in the batch; a row leaves at its delimiter, EOS, its step cap or its call's budget, where
``generate_step`` would stop, and its cache is then cut back out of the batch, without the
padding, into its session. The session is then as if ``generate_step`` had run on it alone: the
same tokens, ids, partial step and logits, tensors equal up to the float rounding of batched
matmuls (about 1e-6).

A row in an unusual state is not batched (``batchable``): the backend runs it alone through
``generate_step``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from dreamr_stream.backends.base import StepCall, StepOutput

__all__ = ["PaddedCache", "Row", "batchable", "decode_rows", "rows_to_batch"]

log = logging.getLogger(__name__)


def batchable(call: StepCall) -> bool:
    """Whether ``call`` can join a batch. Not: a sampled temperature (its generator's draws stay
    per call), a Qwen2-VL-style session (3-D mrope positions), a pending proposal (a repair
    verifies several guessed tokens per forward), a finished answer, a begun step already at its
    cap, a zero budget, a length whose logits are not kept (after a rollback), or a cache that is
    not plain full-attention layers (sliding windows). Those run alone, through ``generate_step``,
    which ends them as it always does."""
    s = call.session
    cache = getattr(s, "cache", None)
    return (
        call.temperature <= 0.0
        and getattr(s, "rope_deltas", True) is None
        and not s.proposal
        and not s.finished
        and not (s.partial and len(s.partial) >= call.max_tokens)
        and (call.budget is None or call.budget > 0)
        and len(s.ids) in s.logits_at
        and isinstance(cache, DynamicCache)
        and bool(cache.layers)
        and all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)
        and cache.get_seq_length() == len(s.ids)
    )


def rows_to_batch(calls: list[StepCall]) -> list[int]:
    """The indices of ``calls`` to decode together: the batchable ones whose session appears only
    once (a session named twice runs its calls alone, in order). Fewer than two: none, since one
    row alone is cheapest as a plain ``generate_step``."""
    seen = Counter(id(c.session) for c in calls)
    rows = [i for i, c in enumerate(calls) if seen[id(c.session)] == 1 and batchable(c)]
    return rows if len(rows) > 1 else []


@dataclass
class Row:
    """One call in the batch and what it has done so far."""

    call: StepCall
    new: int = 0  # tokens decoded by this call
    forwards: int = 0  # forwards that fed this row
    out: StepOutput | None = None  # set when the row leaves

    @property
    def session(self) -> Any:
        return self.call.session


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """A cache's layers, all plain ``DynamicLayer``s here (``batchable`` checks the sessions')."""
    return cast(list[DynamicLayer], cache.layers)


def _tensor(t: torch.Tensor | None) -> torch.Tensor:
    assert t is not None  # an initialised layer's keys and values
    return t


class PaddedCache:
    """Several sessions' caches left-padded and stacked into one, for the rows still in the batch.

    ``pads[r]``: padding columns before row r's tokens; ``positions[r]``: the position of its next
    token (its own length). ``release`` cuts rows back out into their sessions' caches.
    """

    def __init__(self, rows: list[Row], config: Any) -> None:
        caches = [r.session.cache for r in rows]
        lengths = [c.get_seq_length() for c in caches]
        width = max(lengths)
        self.rows = list(rows)
        self.pads = [width - n for n in lengths]
        self.cache = DynamicCache(config=config)  # as the sessions' own (``batchable``: plain layers)
        for i, layer in enumerate(_layers(self.cache)):
            first = caches[0].layers[i]
            # (rows, heads, width, head_dim), each row's (heads, n, head_dim) on the right, zeros on the left
            keys = first.keys.new_zeros((len(caches), first.keys.shape[1], width, first.keys.shape[3]))
            values = first.values.new_zeros((len(caches), first.values.shape[1], width, first.values.shape[3]))
            for r, (c, p) in enumerate(zip(caches, self.pads, strict=True)):
                keys[r, :, p:] = c.layers[i].keys[0]
                values[r, :, p:] = c.layers[i].values[0]
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        device = caches[0].layers[0].keys.device
        # (rows, width): 1 where a row has a token, 0 over its padding
        self.mask = (
            torch.arange(width, device=device)[None, :] >= torch.tensor(self.pads, device=device)[:, None]
        ).long()
        self.positions = torch.tensor(lengths, device=device)

    def forward(self, model: Any, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row (in ``rows`` order); returns the logits after each: (rows, vocab)."""
        device = self.mask.device
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(tokens), 1))], dim=1)
        out = model(
            input_ids=torch.tensor(tokens, device=device)[:, None],  # (rows, 1)
            attention_mask=self.mask,  # (rows, width + 1)
            position_ids=self.positions[:, None],  # (rows, 1): each row's own next position
            cache=self.cache,
            use_cache=True,
        )
        self.positions = self.positions + 1
        return out.logits[:, -1].float()

    def release(self, leaving: list[Row]) -> None:
        """Write the ``leaving`` rows' caches back into their sessions (unpadded) and drop them
        from the batch; trim the padding columns no row needs any more."""
        if not leaving:
            return
        gone = {id(r) for r in leaving}
        for i, r in enumerate(self.rows):
            if id(r) in gone:
                for own, layer in zip(_layers(r.session.cache), _layers(self.cache), strict=True):
                    # (1, heads, length, head_dim), copied so the batch's tensors can be freed
                    own.keys = _tensor(layer.keys)[i : i + 1, :, self.pads[i] :].clone()
                    own.values = _tensor(layer.values)[i : i + 1, :, self.pads[i] :].clone()
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return
        trim = min(self.pads[i] for i in keep)
        index = torch.tensor(keep, device=self.mask.device)
        for layer in _layers(self.cache):
            layer.keys = _tensor(layer.keys).index_select(0, index)[:, :, trim:]
            layer.values = _tensor(layer.values).index_select(0, index)[:, :, trim:]
        self.mask = self.mask.index_select(0, index)[:, trim:]
        self.positions = self.positions.index_select(0, index)
        self.pads = [self.pads[i] - trim for i in keep]


def decode_rows(
    model: Any,
    rows: list[Row],
    *,
    eos_ids: set[int],
    decode: Callable[[list[int]], str],
    close_step: Callable[[Any, str, str, int, int, int], StepOutput],
    end_step: Callable[[Any, StepOutput], StepOutput],
) -> None:
    """Greedy-decode ``rows`` (all ``batchable``, distinct sessions) in lockstep until each has
    left, setting each row's ``out``; each session ends holding its own cache again.

    The loop is ``generate_step``'s, row by row: before each token the budget, then EOS (the
    session's answer ends; nothing fed); after it, the delimiter or the step cap, where the
    backend's ``close_step`` ends the step on the row's own cache (canonicalised, or a delimiter
    fed: one more forward of that row alone, which is rare: a step usually ends at a delimiter
    token the model wrote). ``end_step`` resets a session whose step ended.
    """
    batch = PaddedCache(rows, model.config)
    try:
        # each row's greedy next token, from the logits that predict it, for the rows in the batch
        best = torch.stack([r.session.logits_at[len(r.session.ids)] for r in rows]).argmax(-1).tolist()
        while batch.rows:
            leaving: list[Row] = []
            tokens: list[int] = []
            for r, token in zip(batch.rows, best, strict=True):
                s, budget = r.session, r.call.budget
                if budget is not None and r.new >= budget:
                    r.out = StepOutput(decode(s.partial), False, False, r.new, r.forwards, 0)
                    leaving.append(r)
                elif token in eos_ids:
                    s.finished = True  # not fed: nothing follows the end of the answer
                    r.out = end_step(s, StepOutput(decode(s.partial), True, True, r.new + 1, r.forwards, 0))
                    leaving.append(r)
                else:
                    tokens.append(token)
            batch.release(leaving)
            if not batch.rows:
                break
            logits = batch.forward(model, tokens)  # (rows, vocab)
            ended: list[tuple[Row, str]] = []
            best_next: list[int] = []
            for r, token, row_logits, nxt in zip(batch.rows, tokens, logits, logits.argmax(-1).tolist(), strict=True):
                s = r.session
                s.ids.append(token)
                s.logits_at[len(s.ids)] = row_logits.clone()  # its own storage, not the batch's
                s.partial.append(token)
                r.new += 1
                r.forwards += 1
                text = decode(s.partial)
                if r.call.stop in text or len(s.partial) >= r.call.max_tokens:
                    ended.append((r, text))
                else:
                    best_next.append(nxt)
            best = best_next
            batch.release([r for r, _ in ended])
            for r, text in ended:  # on the row's own cache again
                r.out = close_step(r.session, text, r.call.stop, r.new, r.forwards, 0)
    finally:  # a failure leaves no session without its own cache
        batch.release(list(batch.rows))
