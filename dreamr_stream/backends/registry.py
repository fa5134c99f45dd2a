"""Backends opened and described in one place.

* ``open(spec)`` turns what a caller names into a backend: a local model folder (transformers,
  in this process or in a child process), a URL (a model served over the OpenAI-compatible chat
  API), or a backend already built (returned as it is). What a URL means is decided here and
  nowhere else: vLLM's dialect of that API (``backends.vllm``), the server the project ships a
  launcher for (``python -m dreamr_vllm``). A backend for another server (a subclass of
  ``backends.openai_compat.OpenAICompatBackend``) is built by its caller and passed as an object.
* ``capabilities_of(backend)`` reads what a backend declares (``Capabilities``). It is the one
  place that inspects a backend object: the engine and the Reasoner read the typed value, and
  ``shutdown``/``aclose`` free a backend's resources by what it declares.

This module imports neither torch nor httpx: each kind of backend is imported when one is opened.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Literal, TypeAlias, cast

from dreamr_stream.backends.base import AsyncModelBackend, AsyncReleases, Capabilities, ModelBackend, Releases
from dreamr_stream.errors import ConfigError

__all__ = ["Backend", "BackendSpec", "aclose", "capabilities_of", "is_url", "open", "shutdown"]

log = logging.getLogger(__name__)

Backend: TypeAlias = "ModelBackend[Any] | AsyncModelBackend[Any]"
# a local model folder, a server's URL (http://host:8000/v1), or a backend already built
BackendSpec: TypeAlias = "str | Path | ModelBackend[Any] | AsyncModelBackend[Any]"


def is_url(spec: object) -> bool:
    """A served model's address (``http://``/``https://``), as opposed to a local folder."""
    return isinstance(spec, str) and spec.startswith(("http://", "https://"))


def open(  # the registry's verb, ``registry.open(spec)``: this module never opens a file
    spec: BackendSpec,
    *,
    name: str = "model",
    device: str = "auto",
    process: bool = False,
    wait: bool = True,
    settings_from: str | Path | None = None,
) -> Backend:
    """The backend ``spec`` names.

    * a URL: the model served there, over vLLM's OpenAI-compatible API (``backends.vllm``;
      needs the ``vllm`` extra). Nothing connects until the first request. ``settings_from``: a
      local model folder whose ``dreamr.json`` (judge template, recommended verification, task)
      applies to it, since the server does not tell them;
    * a local model folder: a ``TransformersBackend`` on ``device`` (``auto``: a GPU when there
      is one); ``process``: in a child process of its own (``ProcessBackend``; ``wait``: until
      it has loaded, else call its ``ready()``). Its own ``dreamr.json`` applies
      (``settings_from`` is for served models and is not read);
    * a backend object: returned as it is (``name`` and the rest do not apply).
    """
    if is_url(spec):
        return _served(cast(str, spec), name=name, settings_from=settings_from)
    if isinstance(spec, (str, Path)):
        if process:
            from dreamr_stream.backends.process import ProcessBackend

            return ProcessBackend.from_pretrained(spec, device=device, name=name, wait=wait)
        from dreamr_stream.backends.hf import TransformersBackend

        return TransformersBackend.from_pretrained(spec, device=device, name=name)
    return spec


def _served(url: str, *, name: str, settings_from: str | Path | None) -> Backend:
    """A model served at ``url``, spoken to in vLLM's dialect (imports httpx: the ``vllm`` extra)."""
    from dreamr_stream.backends.vllm import VLLMBackend

    return VLLMBackend.connect(url, name=name, settings_from=settings_from)


_inferred_types: set[type] = set()  # backends told once that their capabilities were inferred


def capabilities_of(backend: object) -> Capabilities:
    """The backend's declared ``capabilities``.

    A backend written before backends declared them (it has the protocol's methods but no
    ``capabilities``) still works: its capabilities are inferred from the attributes that
    protocol used (``identity``, ``device``, ``begin_step``, ``cpu_threads``/``use_threads``,
    ``recommended_verification``, ``shutdown``/``aclose``), with one log line per class. This is
    the only place that looks at a backend's attributes. Anything else is a ``ConfigError``."""
    declared = getattr(backend, "capabilities", None)
    if isinstance(declared, Capabilities):
        return declared
    kind = type(backend).__name__
    if declared is not None:
        raise ConfigError(f"{kind}.capabilities must be a backends.base.Capabilities, not {type(declared).__name__}")
    if not callable(getattr(backend, "generate_step", None)) or not hasattr(backend, "name"):
        raise ConfigError(
            f"{kind} is not a model backend: it declares no capabilities and has no name and generate_step "
            "(see dreamr_stream.backends.base)"
        )
    if type(backend) not in _inferred_types:
        _inferred_types.add(type(backend))
        log.info("%s declares no capabilities; inferred from its attributes (declare backends.base.Capabilities)", kind)
    return _inferred(backend)


def _inferred(backend: Any) -> Capabilities:
    """What the attributes of a backend without ``capabilities`` show."""
    device = getattr(backend, "device", "cpu")
    release: Literal["none", "sync", "async"] = (
        "async" if hasattr(backend, "aclose") else "sync" if hasattr(backend, "shutdown") else "none"
    )
    return Capabilities(
        identity=str(getattr(backend, "identity", backend.name)),
        device=str(getattr(device, "type", device)),
        concurrent=inspect.iscoroutinefunction(backend.generate_step),
        repair=hasattr(backend, "begin_step"),
        cpu_threads=int(getattr(backend, "cpu_threads", 0)) if hasattr(backend, "use_threads") else 0,
        sets_threads=hasattr(backend, "use_threads"),
        recommended_verification=dict(getattr(backend, "recommended_verification", {}) or {}),
        task=getattr(backend, "task", None),
        release=release,
    )


def shutdown(backend: object) -> None:
    """Free what a backend holds outside this process's memory (a child process), if anything."""
    if capabilities_of(backend).release == "sync":
        cast(Releases, backend).shutdown()


async def aclose(backend: object) -> None:
    """Close what an async backend holds (its connections), if anything; on their event loop."""
    if capabilities_of(backend).release == "async":
        await cast(AsyncReleases, backend).aclose()
