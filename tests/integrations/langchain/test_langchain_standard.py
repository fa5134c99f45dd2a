"""LangChain's standard chat-model suites against ChatDreamr; the integration suite on the demo models.

Capabilities are declared with the suites' own properties. Skipped, because the demo (and any
dreamr) reasoner does not have them: tool calling, tool choice and structured output (the models
write reasoning steps, not tool calls or JSON), PDF / audio / video inputs, remote image URLs
(images are never fetched), images inside ToolMessages, Anthropic-specific inputs (they need tool
calling), serialisation (a model holds a live Reasoner) and init from environment variables
(there is no API key or endpoint to read).

Two local adaptations: ``test_image_inputs`` downloads a picture with ``httpx.get``, which is served
from ``examples/images`` instead (no network); and the suites send text-only prompts ("Hello"), so
the model is given a ``default_image`` for conversations without one. The suites' coroutine tests
are unmarked (they expect ``asyncio_mode = "auto"``); this project runs pytest-asyncio in strict
mode, so the class is marked ``asyncio`` and the warning for its sync tests is silenced.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import langchain_tests.integration_tests.chat_models as integration_suite
import pytest
from dreamr_langchain import ChatDreamr
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests
from lc_support import PUZZLE, shared_demo

_SYNC_TEST_WARNING = "ignore:.*is marked with '@pytest.mark.asyncio' but it is not an async function"


class TestChatDreamrUnit(ChatModelUnitTests):
    """Construction, standard parameters and tracing parameters; nothing is loaded or run."""

    @property
    def chat_model_class(self) -> type[ChatDreamr]:
        return ChatDreamr

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {}  # no reasoner: the demo models would load on the first call, which never comes

    @property
    def supports_image_inputs(self) -> bool:
        return True


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.filterwarnings(_SYNC_TEST_WARNING)
class TestChatDreamrIntegration(ChatModelIntegrationTests):
    """Every call runs the shipped demo models on CPU (about 0.2-2 s a request)."""

    @property
    def chat_model_class(self) -> type[ChatDreamr]:
        return ChatDreamr

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"reasoner": shared_demo(), "default_image": PUZZLE}

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def supports_image_urls(self) -> bool:
        return False  # remote URLs are refused, never fetched

    @property
    def model_override_value(self) -> str:
        return "dreamr-target_only"

    @pytest.fixture(autouse=True)
    def _serve_test_images_locally(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        """``test_image_inputs`` downloads a PNG: answer with a local one, and refuse anything else."""

        def get(url: str, *args: Any, **kwargs: Any) -> httpx.Response:
            if not url.endswith(".png"):
                raise AssertionError(f"unexpected download in a hermetic test: {url}")
            return httpx.Response(200, content=PUZZLE.read_bytes(), request=httpx.Request("GET", url))

        monkeypatch.setattr(integration_suite.httpx, "get", get)
        yield
