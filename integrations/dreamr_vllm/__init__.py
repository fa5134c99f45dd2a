"""FPSR over models served by vLLM: a launcher for a local server (``python -m dreamr_vllm``),
its load bench, and the async backend for its OpenAI-compatible API (which lives in the core,
``dreamr_stream.backends.vllm``, re-exported here).

    from dreamr_stream import Reasoner
    reasoner = Reasoner.from_pretrained(target="http://127.0.0.1:8000/v1", draft="path/to/draft",
                                        settings_from="path/to/target-settings")

``settings_from`` is a folder whose ``dreamr.json`` holds the served model's judge template and
TBVM threshold (the folder the server was started on, or one ``dreamr calibrate --target-url``
measured); without it the Reasoner warns and verifies on uncalibrated defaults.

The target (or the draft, or both) is reached over HTTP; the server batches the calls of every
request (continuous batching). Needs the ``vllm`` extra (``httpx``) on the client side; the
server is vLLM itself, in its own environment (``dreamr_vllm.server.ensure_venv``).
"""

from dreamr_vllm.backend import VLLMBackend, VLLMError, VLLMSession
from dreamr_vllm.server import VLLMServer, VLLMServerError, ensure_venv

__all__ = ["VLLMBackend", "VLLMError", "VLLMServer", "VLLMServerError", "VLLMSession", "ensure_venv"]
