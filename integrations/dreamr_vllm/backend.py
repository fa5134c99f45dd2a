"""The client of a vLLM server, under the name it had here: it lives in the core
(``dreamr_stream.backends.vllm``, on ``dreamr_stream.backends.openai_compat``) so that
``Reasoner.from_pretrained(target="http://...")`` opens it without the core importing this
integration. This package keeps what needs vLLM itself: the server launcher and the load bench."""

from dreamr_stream.backends.vllm import VLLMBackend, VLLMError, VLLMSession

__all__ = ["VLLMBackend", "VLLMError", "VLLMSession"]
