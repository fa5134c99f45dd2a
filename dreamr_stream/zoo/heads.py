"""The zoo trainer's training-only heads (not shipped) and the losses they and the verdict add.

The per-cell classifier keeps colour and shape in the visual tokens, the error flag teaches a
judge where a candidate goes wrong, the early exit makes a layer predict the next token early,
and the verdict loss weights the one verdict token of a judge item (the model cards say why).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from dreamr_stream.zoo.data import IGNORE, Batch
from dreamr_stream.zoo.digits import DigitTies

__all__ = ["AuxHeads", "own_choice_flags", "step_loss", "verdict_loss"]


class AuxHeads(nn.Module):
    """Training-only heads (not shipped) that shape what the model computes inside:

    * ``head``: a per-cell classifier on the projected visual tokens (keeps colour and shape in them);
    * ``flag_head``: on the hidden state after decoder layer ``flag_layer``, at every token of a
      judge item's candidate, whether the candidate so far is still the reference (an error flag
      the verdict token can then read with one attention step; see the target's card);
    * ``digits``: with ``DigitTies``, the number tokens' embeddings tied through their digits
      (moved into the model's own embeddings before it is saved: ``fold``)."""

    def __init__(self, hidden: int, cell_classes: int, digits: DigitTies | None = None) -> None:
        super().__init__()
        self.head = nn.Linear(hidden, cell_classes)
        self.flag_head = nn.Linear(hidden, 1)
        self.digits = digits
        self.features: torch.Tensor | None = None
        self.layer_out: torch.Tensor | None = None
        self.early_out: torch.Tensor | None = None

    def attach(self, model: LlavaForConditionalGeneration, flag_layer: int | None, early_layer: int | None) -> None:
        layers = model.model.language_model.layers
        model.model.multi_modal_projector.register_forward_hook(self._keep("features"))  # (B, n_cells, hidden)
        if flag_layer is not None:
            layers[flag_layer].register_forward_hook(self._keep("layer_out"))  # (B, T, hidden)
        if early_layer is not None:
            layers[early_layer].register_forward_hook(self._keep("early_out"))  # (B, T, hidden)
        if self.digits is not None:
            self.digits.attach(model)
        # the final norm and LM head read the early layer; set past nn.Module so that the model is
        # not registered as a submodule of the heads (its parameters would be optimised twice)
        object.__setattr__(self, "_reader", model)

    def fold(self, model: LlavaForConditionalGeneration) -> None:
        """Make ``model`` alone compute what it computes with these heads attached (the digit
        ties moved into its embeddings), so it can be saved as a plain checkpoint."""
        if self.digits is not None:
            self.digits.fold(model)

    def _keep(self, attr: str) -> Callable[[nn.Module, object, torch.Tensor | tuple[torch.Tensor, ...]], None]:
        """A forward hook keeping a module's output (a decoder layer's hidden states) as ``attr``."""

        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
            setattr(self, attr, output[0] if isinstance(output, tuple) else output)

        return hook

    def early_exit_loss(self, labels: torch.Tensor) -> torch.Tensor:
        """The language-model loss of the early layer's hidden state through the final norm and LM head."""
        model: LlavaForConditionalGeneration = self.__dict__["_reader"]
        logits = model.lm_head(model.model.language_model.norm(self.early_out))[:, :-1]
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)

    def flag_loss(self, flags: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of the flag head where ``flags`` supervises one (0 if nowhere)."""
        assert self.layer_out is not None
        where = flags != IGNORE
        if not bool(where.any()):
            return self.layer_out.sum() * 0.0
        logits = self.flag_head(self.layer_out[where]).squeeze(-1)
        return nn.functional.binary_cross_entropy_with_logits(logits, flags[where].float())


def step_loss(
    model: LlavaForConditionalGeneration, aux: AuxHeads, batch: Batch, aux_weight: float
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's forward on ``batch`` (its output, with the language-model loss), the per-cell
    loss, their weighted sum and the per-cell logits."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        labels=batch.labels,
    )
    assert aux.features is not None
    aux_logits = aux.head(aux.features)  # (B, n_cells, classes)
    aux_loss = nn.functional.cross_entropy(aux_logits.flatten(0, 1), batch.cells.flatten())
    return out, aux_loss, out.loss + aux_weight * aux_loss, aux_logits


def own_choice_flags(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Where ``batch.flags`` supervises a flag: 1 if the token there is the model's greedy choice
    after the tokens before it (``logits`` of this forward), else 0; IGNORE elsewhere."""
    own = torch.zeros_like(batch.flags)
    own[:, 1:] = (logits[:, :-1].detach().argmax(-1) == batch.input_ids[:, 1:]).long()
    return torch.where(batch.flags != IGNORE, own, torch.full_like(own, IGNORE))


def verdict_loss(logits: torch.Tensor, labels: torch.Tensor, verdict: tuple[int, int]) -> torch.Tensor:
    """Cross-entropy on the verdict token of judge items (rows whose last label is a verdict)."""
    last = (labels != IGNORE).long().cumsum(1).argmax(1)  # index of the last supervised token, (B,)
    rows = torch.arange(labels.shape[0])
    gold = labels[rows, last]
    is_judge = (gold == verdict[0]) | (gold == verdict[1])
    if not bool(is_judge.any()):
        return logits.sum() * 0.0
    pred = logits[rows, last - 1]  # logits at t predict token t+1: (B, vocab)
    return nn.functional.cross_entropy(pred[is_judge], gold[is_judge])
