"""Tiny, randomly initialised image-text-to-text models of four families, built in-process.

No hub, no torchvision: one byte-level BPE trained once per test session with every family's
special tokens (448 tokens in all), PIL image processors, and models with a 32-wide, 2-layer
language model and a 1-2 layer vision tower on 56-112 px images (~70-130k parameters). Each
``Family`` builds ``(model, processor)``; ``build_family`` saves them with ``save_pretrained``
so a test can load the folder back through ``TransformersBackend.from_pretrained``, exactly
like a real checkpoint.

Qwen2-VL and Qwen2.5-VL's stock processors require a video processor, and every video processor
needs torchvision, so those families use ``ImageOnlyQwen2VLProcessor`` / ``ImageOnlyQwen2_5_VLProcessor``:
the stock processors minus the video processor. They are registered with ``AutoProcessor``
(``register_image_only_processors``) so that the ``processor_class`` name written in the saved
``processor_config.json`` resolves when the folder is loaded back in this process.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from dreamr_stream.config import JudgeTemplate
from dreamr_stream.zoo.build import CHAT_TEMPLATE, train_bpe

__all__ = [
    "FAMILIES",
    "JUDGE",
    "Family",
    "build_family",
    "make_tokenizer",
    "register_image_only_processors",
    "sample_images",
]

# Verdicts are single tokens of the tokenizer below (``make_tokenizer`` checks it); the suffix
# may be several.
JUDGE = JudgeTemplate(suffix="Check:", positive=" yes", negative=" no")

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IMAGE = "<image>"  # LLaVA and Idefics3
IDEFICS3_TOKENS = [
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
]
QWEN_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
SPECIAL_TOKENS = [EOS, PAD, IMAGE, "<|user|>", "<|assistant|>", *IDEFICS3_TOKENS, *QWEN_TOKENS]

_WORDS = (
    "the a an of to in is it on at red blue green black white grid row column cell cells square "
    "count how many what colour color there are left right top bottom first second third step "
    "so answer total one two three four five six seven eight nine ten image shows we see"
).split()


def _corpus() -> list[str]:
    texts = [f"{JUDGE.suffix}{JUDGE.positive}", f"{JUDGE.suffix}{JUDGE.negative}", "User: Assistant:"] * 40
    for i, w in enumerate(_WORDS):
        nxt = _WORDS[(i * 7 + 3) % len(_WORDS)]
        texts.extend([f"{w} {nxt}.\n", f" {w}, {nxt}?\n", f"{w.capitalize()} {i % 10}\n"] * 3)
    return texts


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json(vocab_size: int = 448) -> str:
    # the demo models' recipe (newlines their own tokens: the "\n" step delimiter never merges
    # with step text) on a corpus of every family's words
    return train_bpe(_corpus(), vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS).to_str()


def make_tokenizer(chat_template: str, **special: str) -> PreTrainedTokenizerFast:
    """A fresh tokenizer object over the session's BPE (processors may add tokens to theirs)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=special,
        chat_template=chat_template,
        model_max_length=4096,
    )
    for word in (JUDGE.positive, JUDGE.negative):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"judge verdict {word!r} is {len(ids)} tokens in the test tokenizer"
    assert tokenizer("\n", add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids("Ċ")]
    return tokenizer


def _ids(tokenizer: PreTrainedTokenizerFast, *tokens: str) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    assert None not in ids and (tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids), tokens
    return ids


# ---------------------------------------------------------------------------------- chat templates
PLAIN_TEMPLATE = CHAT_TEMPLATE  # LLaVA: the demo models' template
IDEFICS3_TEMPLATE = (  # the SmolVLM / Idefics3 layout
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'image' %}<image>"
    "{% elif block['type'] == 'text' %}{{ block['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
QWEN_TEMPLATE = (  # ChatML with vision markers, as in Qwen2-VL / Qwen2.5-VL
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif block['type'] == 'text' %}{{ block['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---------------------------------------------------------------------------------- processors
class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)


class _ImageOnlyProcessorKey(PreTrainedConfig):
    """A config class used only as ``AutoProcessor`` registry key: registering under the real
    Qwen configs would replace the stock processors for every Qwen2-VL folder in the process."""

    model_type = "dreamr_test_image_only"


class _ImageOnlyProcessorKey25(PreTrainedConfig):
    model_type = "dreamr_test_image_only_2_5"


def register_image_only_processors() -> None:
    """Let ``AutoProcessor.from_pretrained`` resolve the image-only classes by the
    ``processor_class`` name saved in ``processor_config.json`` (idempotent)."""
    AutoProcessor.register(_ImageOnlyProcessorKey, ImageOnlyQwen2VLProcessor, exist_ok=True)
    AutoProcessor.register(_ImageOnlyProcessorKey25, ImageOnlyQwen2_5_VLProcessor, exist_ok=True)


# ---------------------------------------------------------------------------------- families
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=512,
)


def _llama(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        **TEXT,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def build_llava() -> tuple[PreTrainedModel, Any]:
    tokenizer = make_tokenizer(PLAIN_TEMPLATE, image_token=IMAGE)
    size, patch = 56, 14  # 16 patches; the CLS token is dropped ("default" strategy)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=PLAIN_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=size,
        patch_size=patch,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_llama(tokenizer),
        image_token_id=_ids(tokenizer, IMAGE)[0],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(size // patch) ** 2,
        tie_word_embeddings=False,
    )
    return _finish(LlavaForConditionalGeneration(config), tokenizer), processor


def build_idefics3() -> tuple[PreTrainedModel, Any]:
    tokenizer = make_tokenizer(IDEFICS3_TEMPLATE, image_token=IMAGE)
    tile, patch, scale = 32, 8, 2  # (32/8)^2 / 2^2 = 4 image tokens per tile
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * tile},  # up to 2x2 tiles + the global image
        max_image_size={"longest_edge": tile},
        do_image_splitting=True,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(tile // patch) ** 2 // scale**2,
        chat_template=IDEFICS3_TEMPLATE,
    )
    vision = Idefics3VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=tile,
        patch_size=patch,
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=_llama(tokenizer),
        image_token_id=_ids(tokenizer, IMAGE)[0],
        scale_factor=scale,
        tie_word_embeddings=False,
    )
    return _finish(Idefics3ForConditionalGeneration(config), tokenizer), processor


def _qwen_common(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    image_id, video_id, start_id, end_id = _ids(
        tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    )
    text = dict(
        vocab_size=len(tokenizer),
        **TEXT,
        # head_dim 16 -> 8 rotary frequencies, split over (temporal, height, width)
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return dict(
        text_config=text,
        image_token_id=image_id,
        video_token_id=video_id,
        vision_start_token_id=start_id,
        vision_end_token_id=end_id,
        tie_word_embeddings=False,
    )


def _qwen_image_processor() -> Qwen2VLImageProcessorPil:
    # patch 14, merge 2: a 56 px square image is 4x4 patches -> 4 tokens; 112x56 -> 8 tokens
    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2)


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(QWEN_TEMPLATE, image_token="<|image_pad|>", video_token="<|video_pad|>")


def build_qwen2_vl() -> tuple[PreTrainedModel, Any]:
    tokenizer = _qwen_tokenizer()
    processor = ImageOnlyQwen2VLProcessor(
        image_processor=_qwen_image_processor(), tokenizer=tokenizer, chat_template=QWEN_TEMPLATE
    )
    vision = dict(
        depth=1,
        embed_dim=32,
        hidden_size=TEXT["hidden_size"],
        num_heads=2,
        mlp_ratio=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    config = Qwen2VLConfig(vision_config=vision, **_qwen_common(tokenizer))
    return _finish(Qwen2VLForConditionalGeneration(config), tokenizer), processor


def build_qwen2_5_vl() -> tuple[PreTrainedModel, Any]:
    tokenizer = _qwen_tokenizer()
    processor = ImageOnlyQwen2_5_VLProcessor(
        image_processor=_qwen_image_processor(), tokenizer=tokenizer, chat_template=QWEN_TEMPLATE
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=TEXT["hidden_size"],
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],  # one windowed and one full-attention block
    )
    config = Qwen2_5_VLConfig(vision_config=vision, **_qwen_common(tokenizer))
    return _finish(Qwen2_5_VLForConditionalGeneration(config), tokenizer), processor


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], tuple[PreTrainedModel, Any]]
    mrope: bool = False  # Qwen2-VL-style 3-D positions with per-sequence rope deltas


FAMILIES = [
    Family("llava", build_llava),
    Family("idefics3", build_idefics3),
    Family("qwen2_vl", build_qwen2_vl, mrope=True),
    Family("qwen2_5_vl", build_qwen2_5_vl, mrope=True),
]


def build_family(family: Family, folder: Path, *, seed: int = 0) -> tuple[PreTrainedModel, Any]:
    """Build ``family`` with a fixed seed and save model + processor (+ judge sidecar) to ``folder``."""
    register_image_only_processors()
    torch.manual_seed(seed)
    model, processor = family.build()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "dreamr.json").write_text(json.dumps({"judge": JUDGE.model_dump()}))
    return model, processor


def sample_images() -> tuple[Image.Image, Image.Image]:
    """Two images of different content AND shape: for the Qwen families a 56x56 and a 112x56
    image give different rope deltas, which is what exposes shared position state."""
    a = Image.new("RGB", (56, 56), (200, 30, 30))
    for x in range(0, 56, 14):
        a.paste((20, 20, 220), (x, x, x + 14, x + 14))
    b = Image.new("RGB", (112, 56), (30, 160, 60))
    b.paste((250, 250, 250), (56, 0, 112, 28))
    return a, b
