"""Number tokens' embeddings tied through their digits while a model trains (not shipped as such).

The demo tokenizers write every number up to a few hundred as one token, so a model that adds
``30 + 16`` must know the units digit of the token `` 16``; a learned embedding carries a number's
size far better than its last digit (the chart target's card), and the target wrote sums whose
units were one off. ``DigitTies`` adds to the embedding of every number token a sum of shared
vectors, one per decimal place and digit: `` 16`` gets ``units[6] + tens[1] + hundreds[0]``.
Every number with a 6 in its units then moves the same ``units[6]``, so what a digit means is
learned from all the numbers that have it, and a digit can be read off (or written into) any
number's embedding along one direction. The LM head is tied to the embeddings, so the same
vectors shape which number is written.

The ties exist only while training: ``fold`` adds them into the embedding matrix and zeroes the
table, which leaves every output unchanged, so a saved model is a plain checkpoint that loads and
runs without this module.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerBase

__all__ = ["DigitTies", "number_tokens"]

PLACES = 3  # units, tens, hundreds: the demo tasks' numbers stay below a thousand


def number_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[int, int]:
    """Each token that is a whole number (with or without its leading space) -> the number, for
    numbers below ``10 ** PLACES``."""
    out: dict[int, int] = {}
    for token_id in range(len(tokenizer)):
        text = str(tokenizer.decode([token_id])).strip()
        if text.isdecimal() and text.isascii() and int(text) < 10**PLACES:
            out[token_id] = int(text)
    return out


class DigitTies(nn.Module):
    """A table of ``PLACES * 10`` vectors (zero at first, so attaching changes nothing) added to
    the number tokens' embeddings, and through the tied LM head to their logits."""

    ids: torch.Tensor  # the number tokens, (n_numbers,)
    slots: torch.Tensor  # each one's table row per place, (n_numbers, PLACES)

    def __init__(self, tokenizer: PreTrainedTokenizerBase, hidden: int) -> None:
        super().__init__()
        numbers = number_tokens(tokenizer)
        if not numbers:
            raise ValueError("the tokenizer has no number tokens to tie through their digits")
        ids = torch.tensor(sorted(numbers))
        # row of the table for each place's digit of each number token: (n_numbers, PLACES)
        slots = torch.tensor([[10 * p + numbers[int(i)] // 10**p % 10 for p in range(PLACES)] for i in ids])
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("slots", slots, persistent=False)
        self.vocab = len(tokenizer)
        self.table = nn.Parameter(torch.zeros(10 * PLACES, hidden))

    def delta(self) -> torch.Tensor:
        """What the ties add to each token's embedding: (vocab, hidden), zero but for numbers."""
        rows = self.table[self.slots].sum(1)  # (n_numbers, hidden)
        full = torch.zeros(self.vocab, self.table.shape[1], dtype=rows.dtype, device=rows.device)
        return full.index_add(0, self.ids, rows)

    def attach(self, model: LlavaForConditionalGeneration) -> None:
        """Add the ties to ``model``'s input embeddings and LM head (forward hooks)."""
        if _embedding_matrix(model) is not model.lm_head.weight:
            raise ValueError("digit ties need the LM head tied to the input embeddings")
        model.get_input_embeddings().register_forward_hook(self._on_embeddings)
        model.lm_head.register_forward_hook(self._on_logits)

    def _on_embeddings(
        self, _module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        return output + nn.functional.embedding(inputs[0], self.delta())

    def _on_logits(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output + inputs[0] @ self.delta().T

    @torch.no_grad()
    def fold(self, model: LlavaForConditionalGeneration) -> None:
        """Move the ties into ``model``'s embedding matrix and zero the table: the outputs stay
        as they were, and ``model`` saved now needs nothing of this module."""
        weight = _embedding_matrix(model)
        weight.add_(self.delta().to(weight.dtype))
        self.table.zero_()


def _embedding_matrix(model: LlavaForConditionalGeneration) -> torch.Tensor:
    embeddings = model.get_input_embeddings()
    assert isinstance(embeddings, nn.Embedding)
    return embeddings.weight
