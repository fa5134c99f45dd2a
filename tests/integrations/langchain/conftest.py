"""Fixtures for the LangChain adapter tests (helpers live in ``lc_support``)."""

from __future__ import annotations

import pytest
from lc_support import make_reasoner, png_bytes, shared_demo

from dreamr_stream import Reasoner


@pytest.fixture
def reasoner() -> Reasoner:
    return make_reasoner()


@pytest.fixture
def png() -> bytes:
    return png_bytes()


@pytest.fixture(scope="session")
def demo_reasoner() -> Reasoner:
    return shared_demo()
