"""Shared fixtures: tiny in-process demo-architecture models (random weights, no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def demo_processor():  # type: ignore[no-untyped-def]
    from dreamr_stream.zoo.build import build_processor, build_tokenizer

    return build_processor(build_tokenizer(corpus_size=800))


@pytest.fixture(scope="session")
def tiny_pair(demo_processor):  # type: ignore[no-untyped-def]
    """A random tiny target (3 layers) and draft (1 layer) in the demo architecture."""
    from dreamr_stream.backends.hf import TransformersBackend
    from dreamr_stream.config import JudgeTemplate
    from dreamr_stream.zoo.build import JUDGE_SUFFIX, ModelShape, build_model

    judge = JudgeTemplate(suffix=JUDGE_SUFFIX)
    target = build_model(
        demo_processor.tokenizer, ModelShape(hidden=64, layers=3, heads=2, intermediate=128, vision_hidden=32), seed=1
    )
    draft = build_model(
        demo_processor.tokenizer, ModelShape(hidden=32, layers=1, heads=2, intermediate=64, vision_hidden=32), seed=2
    )
    return (
        TransformersBackend(target, demo_processor, name="target", judge=judge),
        TransformersBackend(draft, demo_processor, name="draft", judge=judge),
    )
