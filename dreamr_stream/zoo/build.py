"""Build the demo models' tokenizer, processor and (untrained) models locally: no hub.

The demo models are LLaVA-architecture VLMs (CLIP vision tower + Llama language model) so they
load through the same ``from_pretrained`` path as real checkpoints. The vision tower uses 28 px
patches on a 112 px image: 16 visual tokens, one per grid cell of the task. The sizes and the
tokenizer's corpus come from the task (``task_needs.PerceptionTask``; default: the grid).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from pydantic import Field
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from dreamr_stream.training import TrainingConfig
from dreamr_stream.zoo.task_needs import PerceptionTask, draw, perception_task

__all__ = [
    "CHAT_TEMPLATE",
    "DRAFT_SHAPE",
    "JUDGE_NEG",
    "JUDGE_POS",
    "JUDGE_SUFFIX",
    "TARGET_SHAPE",
    "ModelShape",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "grow_decoder",
    "train_bpe",
]

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", IMAGE_TOKEN, "<|user|>", "<|assistant|>"]
# Verification prompt of the demo target: "<step>\nCheck:" -> " yes" | " no"
JUDGE_SUFFIX = "Check:"
JUDGE_POS = " yes"
JUDGE_NEG = " no"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{% else %}<|assistant|>{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'image' %}<image>"
    "{% elif block['type'] == 'text' %}{{ block['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _corpus(task: PerceptionTask, n: int, seed: int = 0) -> list[str]:
    """The judge prompt's words and the questions and steps of ``n`` train items, a fifth hard."""
    rng = random.Random(seed)
    texts = [f"{JUDGE_SUFFIX}{JUDGE_POS}", f"{JUDGE_SUFFIX}{JUDGE_NEG}"] * 50
    for i in range(n):
        item = draw(task, "train", rng.randrange(10**9), hard=i % 5 == 0)
        texts.append(item.question)
        texts.extend(item.steps)
    return texts


def train_bpe(texts: Iterable[str], *, vocab_size: int, special_tokens: Sequence[str]) -> Tokenizer:
    """A byte-level BPE trained on ``texts``, so their words are single tokens.

    Newlines are split off before BPE: the step delimiter is always a token of its own and
    a step's tokens never depend on what follows it.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build_tokenizer(
    vocab_size: int = 512, corpus_size: int = 4000, *, task: PerceptionTask | None = None
) -> PreTrainedTokenizerFast:
    """The demo models' tokenizer: ``train_bpe`` on the task's text (default: the grid's), with the
    chat template."""
    corpus = _corpus(perception_task(task, needed_by="the demo tokenizer"), corpus_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(corpus, vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS),
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, *, task: PerceptionTask | None = None) -> LlavaProcessor:
    """The demo models' processor for the task's images (default: the grid's), a patch per cell."""
    task = perception_task(task, needed_by="the demo processor")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": task.image_size},
        crop_size={"height": task.image_size, "width": task.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=task.cell_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


class ModelShape(TrainingConfig):
    """Language-model shape of a demo model; the vision tower is shared by all sizes."""

    hidden: int = Field(ge=1)
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    intermediate: int = Field(ge=1)
    vision_hidden: int = Field(default=128, ge=1)


TARGET_SHAPE = ModelShape(hidden=128, layers=24, heads=4, intermediate=384)
DRAFT_SHAPE = ModelShape(hidden=128, layers=2, heads=4, intermediate=384)


def build_model(
    tokenizer: PreTrainedTokenizerFast, shape: ModelShape, seed: int, *, task: PerceptionTask | None = None
) -> LlavaForConditionalGeneration:
    """An untrained demo model of ``shape`` for the task's images (default: the grid's): its vision
    tower sees one patch per cell."""
    import torch

    task = perception_task(task, needed_by="a demo model")
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_hidden * 2,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=task.image_size,
        patch_size=task.cell_size,
        projection_dim=shape.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)),  # type: ignore[arg-type]
        # hidden_states[-2] of a 1-layer tower = the patch embeddings: one token per cell
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(task.image_size // task.cell_size) ** 2,
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def grow_decoder(model: LlavaForConditionalGeneration, layers: int, seed: int) -> int:
    """Append decoder layers on top of ``model``'s language model until it has ``layers``, and
    return the index of the first new one.

    Each new layer starts as the identity: its attention and MLP output projections are zero, so
    the residual stream passes through unchanged and the grown model computes exactly what the
    original did until training moves them. Why grow: the demo target forms its next-token
    prediction only in its last layers (the logit lens in ``benchmarks/results/judge_stage.md``),
    so a judge verdict that checks a candidate's tokens against those predictions needs layers
    after them."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    text = model.model.language_model
    first = len(text.layers)
    if layers < first:
        raise ValueError(f"cannot grow a {first}-layer language model to {layers} layers")
    torch.manual_seed(seed)
    config = text.config
    for idx in range(first, layers):
        layer = LlamaDecoderLayer(config, idx)
        for name, p in layer.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn_init = torch.zeros_like(p)
            elif "layernorm" in name:
                nn_init = torch.ones_like(p)
            else:
                nn_init = torch.randn_like(p) * config.initializer_range
            p.data.copy_(nn_init)
        text.layers.append(layer.to(next(text.parameters()).dtype))
    # the cache is sized from the config, and the saved config.json must say the new depth
    config.num_hidden_layers = layers
    model.config.text_config = config
    return first
