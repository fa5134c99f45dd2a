"""Batched greedy decoding for ``TransformersBackend.generate_batch``: several sessions' steps,
one forward per token for all of them.

Each session owns a ``DynamicCache`` of its own length. For a batch their caches are left-padded
to one width and stacked, per layer (rows, heads, width, head_dim), with an attention mask
(False over each row's padding) and per-row position ids (each row's own length), so that a row
attends to exactly its own tokens at its own positions. Every forward feeds one token per row
still in the batch; a row leaves at its delimiter, EOS, its step cap or its call's budget, where
``generate_step`` would stop, and its cache is then cut back out of the batch, without the
padding, into its session. The session is then as if ``generate_step`` had run on it alone: the
same tokens, ids, partial step and logits, tensors equal up to the float rounding of batched
matmuls (about 1e-6).

A row in an unusual state is not batched (``batchable``): the backend runs it alone through
``generate_step``. What a batched decode step costs besides the model's forward was measured
and cut down (``benchmarks/draft_batch.py``): the batch's cache grows in place (``GrowingLayer``),
SDPA gets its padding mask ready-made, and each row's step is decoded by the tokenizer's Rust core
directly where that is the same (``plain_decoder``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from dreamr_stream.backends.base import StepCall, StepOutput

__all__ = [
    "DEFAULT_BATCH_ROWS",
    "GrowingLayer",
    "PaddedCache",
    "Row",
    "batchable",
    "decode_rows",
    "generate_rows",
    "plain_decoder",
    "rows_to_batch",
]

DEFAULT_BATCH_ROWS = 32  # the most rows ``TransformersBackend.generate_batch`` takes (``Capabilities.batches``)
DEFAULT_ROOM = 16  # tokens a batch's cache has room for at first when a row has no budget (it grows)


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


def plain_decoder(tokenizer: Any) -> Callable[[list[int]], str] | None:
    """``tokenizer.decode(ids, skip_special_tokens=False)`` as a direct call into a fast
    tokenizer's Rust core, where that is all ``decode`` does (no clean-up of spaces, neither
    method overridden, the same text on a sample); None where it would differ. It skips
    ``decode``'s conversion of the ids, which cost as much as the decoding itself: decoding each
    row's step after every token was most of the batched loop's cost besides the forward."""
    core = getattr(tokenizer, "backend_tokenizer", None)
    if core is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    cls = type(tokenizer)
    if cls.decode is not PreTrainedTokenizerBase.decode or getattr(cls, "_decode", None) is not getattr(
        TokenizersBackend, "_decode", None
    ):
        return None

    def decode(ids: list[int]) -> str:
        return str(core.decode(ids, skip_special_tokens=False))

    sample = list(tokenizer("Row 1: empty, red circle.\nAnswer: 3 \u00fc", add_special_tokens=False)["input_ids"])
    sample += list(getattr(tokenizer, "all_special_ids", []))
    same = decode(sample) == tokenizer.decode(sample, skip_special_tokens=False)
    return decode if same else None


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


class GrowingLayer(DynamicLayer):
    """A batch's cache layer: keys and values live in buffers with room for the tokens to come,
    so a decode step writes its token in place instead of copying the whole cache
    (``DynamicLayer.update`` concatenates: at 16 rows that copy was a tenth of a forward).
    ``keys``/``values`` are views of the filled part, (rows, heads, length, head_dim)."""

    def hold(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Take buffers ``keys``/``values`` (rows, heads, capacity, head_dim) filled up to ``length``."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self._keys, self._values, self._length = keys, values, length
        self._show()

    def _show(self) -> None:
        self.keys = self._keys[:, :, : self._length]
        self.values = self._values[:, :, : self._length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._length + key_states.shape[-2]
        if end > self._keys.shape[-2]:  # out of room: twice as much
            keys = self._keys.new_zeros((*self._keys.shape[:2], 2 * end, self._keys.shape[3]))
            values = self._values.new_zeros((*self._values.shape[:2], 2 * end, self._values.shape[3]))
            keys[:, :, : self._length], values[:, :, : self._length] = _tensor(self.keys), _tensor(self.values)
            self.hold(keys, values, self._length)
        self._keys[:, :, self._length : end] = key_states
        self._values[:, :, self._length : end] = value_states
        self._length = end
        self._show()
        return self.keys, self.values  # type: ignore[return-value]

    def select(self, index: torch.Tensor, trim: int) -> None:
        """Keep the rows ``index`` and drop the first ``trim`` columns."""
        self._keys = self._keys.index_select(0, index)[:, :, trim:]
        self._values = self._values.index_select(0, index)[:, :, trim:]
        self._length -= trim
        self._show()


def _layers(cache: DynamicCache) -> list[GrowingLayer]:
    return cast(list[GrowingLayer], cache.layers)


def _tensor(t: torch.Tensor | None) -> torch.Tensor:
    assert t is not None  # an initialised layer's keys and values
    return t


class PaddedCache:
    """Several sessions' caches left-padded and stacked into one, for the rows still in the batch.

    ``pads[r]``: padding columns before row r's tokens; ``positions[r]``: the position of its next
    token (its own length). ``release`` cuts rows back out into their sessions' caches.
    """

    def __init__(self, rows: list[Row], config: Any, room: int = 8) -> None:
        caches = [r.session.cache for r in rows]
        lengths = [c.get_seq_length() for c in caches]
        width = max(lengths)
        self.rows = list(rows)
        self.pads = [width - n for n in lengths]
        self.cache = DynamicCache()
        self.cache.layers = [GrowingLayer() for _ in caches[0].layers]  # ``batchable``: plain layers
        for i, layer in enumerate(_layers(self.cache)):
            k, v = caches[0].layers[i].keys, caches[0].layers[i].values
            # (rows, heads, width + room, head_dim): each row's (heads, n, head_dim) right-aligned at
            # ``width``, zeros on its left (its padding) and after (room for the tokens to come)
            keys = k.new_zeros((len(caches), k.shape[1], width + room, k.shape[3]))
            values = v.new_zeros((len(caches), v.shape[1], width + room, v.shape[3]))
            for r, (c, p) in enumerate(zip(caches, self.pads, strict=True)):
                keys[r, :, p:width] = c.layers[i].keys[0]
                values[r, :, p:width] = c.layers[i].values[0]
            layer.hold(keys, values, width)
        device = caches[0].layers[0].keys.device
        # (rows, width): True where a row has a token, False over its padding
        mask = torch.arange(width, device=device)[None, :] >= torch.tensor(self.pads, device=device)[:, None]
        # SDPA takes the boolean mask as it is, (rows, 1, 1, width) for one query token per row: the
        # model then builds none (measured: 15% of a batched forward at 16 rows, same logits);
        # another attention gets the 2-D padding mask it turns into its own
        sdpa = getattr(config.get_text_config(), "_attn_implementation", None) == "sdpa"
        self.mask = mask[:, None, None, :] if sdpa else mask.long()
        self.positions = torch.tensor(lengths, device=device)

    def forward(self, model: Any, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row (in ``rows`` order); returns the logits after each: (rows, vocab)."""
        device = self.mask.device
        self.mask = torch.cat([self.mask, self.mask.new_ones((*self.mask.shape[:-1], 1))], dim=-1)
        out = model(
            input_ids=torch.tensor(tokens, device=device)[:, None],  # (rows, 1)
            attention_mask=self.mask,  # (rows, width + 1), or (rows, 1, 1, width + 1) for SDPA
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
            layer.select(index, trim)
        self.mask = self.mask.index_select(0, index)[..., trim:]
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
    budgets = [r.call.budget for r in rows]
    room = DEFAULT_ROOM if None in budgets else max(b for b in budgets if b is not None)
    batch = PaddedCache(rows, model.config, room)
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


def generate_rows(
    calls: list[StepCall],
    model: Any,
    *,
    eos_ids: set[int],
    decode: Callable[[list[int]], str],
    close_step: Callable[[Any, str, str, int, int, int], StepOutput],
    end_step: Callable[[Any, StepOutput], StepOutput],
    alone: Callable[[StepCall], StepOutput],
) -> list[StepOutput]:
    """``generate_batch``: the rows that can be batched (``rows_to_batch``) decoded together, then
    the others one by one with ``alone`` (the backend's ``generate_step``), in the calls' order;
    the outputs in the calls' order."""
    rows = {i: Row(calls[i]) for i in rows_to_batch(calls)}
    if rows:
        decode_rows(
            model, list(rows.values()), eos_ids=eos_ids, decode=decode, close_step=close_step, end_step=end_step
        )
    outs: list[StepOutput] = []
    for i, c in enumerate(calls):
        out = rows[i].out if i in rows else None
        outs.append(out if out is not None else alone(c))
    return outs
