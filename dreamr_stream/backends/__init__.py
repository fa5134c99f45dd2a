"""Model backends: where a model computes, behind one protocol.

* ``registry``: ``open(spec)`` (a local folder, a served model's URL, or a backend object) and
  ``capabilities_of(backend)``, the typed ``Capabilities`` every backend declares;
* ``base``: the protocols (``ModelBackend``, ``AsyncModelBackend``) and the values they exchange;
* ``settings``: the one reader of a model folder's ``dreamr.json``;
* ``loading``: the target and draft a Reasoner loads (``load_pair``), the shipped demo's folders;
* ``hf`` (transformers in this process), ``process`` (a backend in a child process),
  ``openai_compat`` and ``vllm`` (a served model), ``fake`` (scripted, for tests).
"""

from dreamr_stream.backends.base import Capabilities
from dreamr_stream.backends.registry import capabilities_of, open

__all__ = ["Capabilities", "capabilities_of", "open"]
