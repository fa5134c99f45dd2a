"""The judge-layers stage's model: the frozen target's trunk cached once, and the grown target's
trained layers (its new layers and any of its own top layers, ``trainable_top``) on top of it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from dreamr_stream.errors import ConfigError
from dreamr_stream.tasks import JudgeItem
from dreamr_stream.zoo.data import IGNORE, judge_item_example

__all__ = ["JudgeLayers", "Padded", "TrunkItem", "cache_trunk", "pad", "start_layers"]


@dataclass
class TrunkItem:
    """A judge item through the frozen target: its tokens up to the judge suffix (the last
    position predicts the verdict), the trunk's output there (what the trained layers start from)
    and the frozen target's last layer output (its next-token distribution: the labels)."""

    ids: torch.Tensor  # (T,)
    hidden: torch.Tensor  # (T, hidden)
    top: torch.Tensor  # (T, hidden): ``hidden`` itself when no layer of the target trains
    start: int  # the candidate's first token
    n_text: int  # the candidate's text tokens: what the likelihood mode reads (not the delimiter)
    correct: bool
    kind: str


@torch.no_grad()
def cache_trunk(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    items: Sequence[JudgeItem],
    *,
    batch: int = 32,
    dtype: torch.dtype = torch.float16,
    below_top: int = 0,
) -> list[TrunkItem]:
    """Run ``model`` (the frozen target) once over every item, shortest first (little padding);
    keep the output of its layer ``below_top`` under the last and of its last layer in ``dtype``
    (fp16 halves a cache of tens of thousands of items)."""
    tok = processor.tokenizer
    kept: dict[str, torch.Tensor] = {}

    def keeper(name: str) -> Callable[[nn.Module, object, torch.Tensor | tuple[torch.Tensor, ...]], None]:
        def keep(_m: nn.Module, _i: object, out: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
            kept[name] = out[0] if isinstance(out, tuple) else out

        return keep

    layers = model.model.language_model.layers
    hooks = [layers[-1 - below_top].register_forward_hook(keeper("h")), layers[-1].register_forward_hook(keeper("top"))]
    examples = []
    for item in items:
        ex, _ = judge_item_example(processor, item)
        start = next(i for i, f in enumerate(ex.flags or []) if f != IGNORE)
        n_text = len(tok(item.candidate, add_special_tokens=False)["input_ids"])
        examples.append((ex.input_ids[:-1], ex.pixel_values, start, n_text, item))  # the verdict token off
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    out: list[TrunkItem | None] = [None] * len(examples)
    try:
        for b in range(0, len(order), batch):
            rows = order[b : b + batch]
            width = max(len(examples[i][0]) for i in rows)
            ids = torch.full((len(rows), width), tok.pad_token_id)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                seq = examples[i][0]
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            model(input_ids=ids, attention_mask=mask, pixel_values=torch.stack([examples[i][1] for i in rows]))
            for r, i in enumerate(rows):
                length = int(mask[r].sum())
                _, _, start, n_text, item = examples[i]
                hidden = kept["h"][r, :length].to(dtype).clone()
                top = hidden if below_top == 0 else kept["top"][r, :length].to(dtype).clone()
                out[i] = TrunkItem(ids[r, :length].clone(), hidden, top, start, n_text, item.correct, item.corruption)
    finally:
        for hook in hooks:
            hook.remove()
    return [t for t in out if t is not None]


class JudgeLayers(nn.Module):
    """The grown target's layers from ``first_trained`` up (its new layers, and any of its own top
    layers that train with them), final norm and LM head over the frozen trunk's output, and the
    training-only heads (flag, gather, copy; not shipped), placed by the new layers' index."""

    norm: nn.Module
    lm_head: nn.Module

    def __init__(
        self, grown: LlavaForConditionalGeneration, first_new: int, flag_after: int, first_trained: int | None = None
    ) -> None:
        super().__init__()
        text = grown.model.language_model
        first_trained = first_new if first_trained is None else first_trained
        # shared with ``grown``: training them trains it
        self.layers = nn.ModuleList(text.layers[first_trained:])
        self.new_from = first_new - first_trained  # the first new layer's index in ``layers``
        self.rotary = text.rotary_emb
        # frozen and owned by ``grown``: kept outside the module tree so they are not saved twice
        object.__setattr__(self, "norm", text.norm)
        object.__setattr__(self, "lm_head", grown.lm_head)
        self.flag_after = flag_after
        hidden = text.config.hidden_size
        self.flag_head = nn.Linear(hidden, 1)
        self.gather_head = nn.Linear(hidden, 1)
        self.copy_head = nn.Linear(hidden, text.config.vocab_size)

    def forward(self, trunk: torch.Tensor) -> dict[str, torch.Tensor]:
        """``trunk``: right-padded frozen last-layer outputs (B, T, hidden). The logits (what the
        grown model outputs there) and the training-only heads' outputs."""
        positions = torch.arange(trunk.shape[1], device=trunk.device)[None].expand(trunk.shape[0], -1)
        rope = self.rotary(trunk, positions)
        h, out = trunk, {}
        for i, layer in enumerate(self.layers):
            # no mask: causal attention, and right padding never reaches an earlier position
            h = layer(h, attention_mask=None, position_ids=positions, position_embeddings=rope)
            new = i - self.new_from
            if new == 0:
                out["copy"] = self.copy_head(h)
            if new == self.flag_after:
                out["flag"] = self.flag_head(h).squeeze(-1)
            if new == self.flag_after + 1:
                out["gather"] = self.gather_head(h).squeeze(-1)
        out["logits"] = self.lm_head(self.norm(h))
        return out

    @torch.no_grad()
    def frozen_logprobs(self, top: torch.Tensor) -> torch.Tensor:
        """The frozen target's next-token log-probabilities (its final norm and head on its last
        layer's output, ``Padded.top``)."""
        return torch.log_softmax(self.lm_head(self.norm(top)), dim=-1)


@dataclass
class Padded:
    trunk: torch.Tensor  # (B, T, hidden)
    top: torch.Tensor  # (B, T, hidden): the frozen target's last layer output
    ids: torch.Tensor  # (B, T)
    real: torch.Tensor  # (B, T) bool: not padding
    counted: torch.Tensor  # (B, T) bool: the candidate's text tokens
    after: torch.Tensor  # (B, T) bool: the candidate and the judge suffix
    last: torch.Tensor  # (B,): the position predicting the verdict


def pad(items: Sequence[TrunkItem]) -> Padded:
    width = max(len(t.ids) for t in items)
    b = len(items)
    p = Padded(
        trunk=torch.zeros((b, width, items[0].hidden.shape[1])),
        top=torch.zeros((b, width, items[0].hidden.shape[1])),
        ids=torch.zeros((b, width), dtype=torch.long),
        real=torch.zeros((b, width), dtype=torch.bool),
        counted=torch.zeros((b, width), dtype=torch.bool),
        after=torch.zeros((b, width), dtype=torch.bool),
        last=torch.tensor([len(t.ids) - 1 for t in items]),
    )
    for r, t in enumerate(items):
        n = len(t.ids)
        p.trunk[r, :n] = t.hidden.float()
        p.top[r, :n] = t.top.float()
        p.ids[r, :n] = t.ids
        p.real[r, :n] = True
        p.counted[r, t.start : t.start + t.n_text] = True
        p.after[r, t.start : n] = True
    return p


def start_layers(grown: LlavaForConditionalGeneration, first: int, folder: Path) -> None:
    """Copy ``folder``'s layers from ``first`` on into ``grown``'s (same depth)."""
    earlier = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    theirs, mine = earlier.model.language_model.layers, grown.model.language_model.layers
    if len(theirs) != len(mine):
        raise ConfigError(f"init_layers_from: {folder} has {len(theirs)} decoder layers, this stage {len(mine)}")
    for i in range(first, len(mine)):
        mine[i].load_state_dict(theirs[i].state_dict())
