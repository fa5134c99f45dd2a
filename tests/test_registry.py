"""Backends are opened through one registry (a folder, a URL, an object), each declares what it
can do in one ``Capabilities`` value, and a model folder's ``dreamr.json`` has one reader."""

from __future__ import annotations

import ast
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dreamr_stream.backends import registry
from dreamr_stream.backends.base import Capabilities
from dreamr_stream.backends.fake import AsyncScriptedBackend, ScriptedBackend
from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.backends.settings import ModelSettings, read_settings
from dreamr_stream.backends.vllm import VLLMBackend
from dreamr_stream.config import CacheConfig, JudgeTemplate, ReasonerConfig, SchedulingConfig
from dreamr_stream.errors import ConfigError
from dreamr_stream.reasoner import Reasoner

ROOT = Path(__file__).resolve().parents[1]
URL = "http://127.0.0.1:9/v1"  # nothing listens there: opening must not connect
IMAGE = Image.new("RGB", (16, 16), (1, 2, 3))
STEPS = ["one step", "another step", "Answer: 2"]
SETTINGS: dict[str, Any] = {
    "task": "grid",
    "judge": {"suffix": "Check:", "positive": " yes", "negative": " no"},
    "verification": {"mode": "likelihood", "tau": 0.25, "taus": {"judge": 0.18, "likelihood": 0.25}},
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, tiny_pair) -> Path:  # type: ignore[no-untyped-def]
    """The tiny draft saved as a model folder with a dreamr.json."""
    out = tmp_path_factory.mktemp("draft")
    _, draft = tiny_pair
    draft.model.save_pretrained(out)
    draft.processor.save_pretrained(out)
    (out / "dreamr.json").write_text(json.dumps(SETTINGS))
    return out


# ---------------------------------------------------------------------- dreamr.json
def test_read_settings_of_a_good_file_and_of_none(tmp_path: Path) -> None:
    (tmp_path / "dreamr.json").write_text(json.dumps({**SETTINGS, "notes": "kept"}))
    settings = read_settings(tmp_path)
    assert settings.task == "grid" and settings.judge == JudgeTemplate(suffix="Check:")
    assert settings.verification == SETTINGS["verification"] and settings.extra == {"notes": "kept"}
    assert settings.to_dict() == {**SETTINGS, "notes": "kept"}  # the dict form, as written
    assert read_settings(tmp_path / "elsewhere") == ModelSettings()  # no file: the defaults
    assert read_settings(tmp_path / "elsewhere").to_dict() == {}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{oops", "not readable JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"task": 3}', "'task' must be a task name"),
        ('{"judge": "Check:"}', "'judge' must be an object"),
        ('{"judge": {"sufix": "Check:"}}', "'judge'"),
        ('{"verification": ["likelihood", 0.25]}', "'verification' must be an object"),
    ],
)
def test_a_malformed_file_is_a_config_error_naming_it(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "dreamr.json").write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        read_settings(tmp_path)
    assert str(tmp_path / "dreamr.json") in str(info.value)
    with pytest.raises(ConfigError, match=match):  # before any weights load
        registry.open(tmp_path, device="cpu")


# ---------------------------------------------------------------------- open
def test_a_folder_opens_in_this_process_with_its_settings(folder: Path) -> None:
    backend = registry.open(folder, name="draft", device="cpu")
    assert isinstance(backend, TransformersBackend) and backend.name == "draft"
    caps = registry.capabilities_of(backend)
    assert (caps.device, caps.concurrent, caps.repair, caps.release) == ("cpu", False, True, "none")
    assert caps.evidence == {"judge", "likelihood"} and caps.sets_threads and caps.cpu_threads >= 1
    assert caps.task == "grid" and caps.recommended_verification == SETTINGS["verification"]
    assert backend.judge == JudgeTemplate(**SETTINGS["judge"])
    assert backend._identity is None  # declaring what it can do does not hash the weights
    assert caps.identity == backend.identity and len(caps.identity) == 16


def test_a_url_opens_a_vllm_client_that_connects_on_first_use(folder: Path) -> None:
    backend = registry.open(URL, name="target", settings_from=folder)
    assert isinstance(backend, VLLMBackend) and backend.name == "target"
    caps = registry.capabilities_of(backend)
    assert (caps.device, caps.concurrent, caps.repair, caps.release) == ("remote", True, True, "async")
    assert caps.evidence == {"judge", "likelihood"} and not caps.sets_threads
    assert caps.cpu_threads >= 1  # a server on loopback computes on these cores
    assert caps.identity == f"vllm:{URL}:?" and caps.task == "grid"
    assert backend.judge == JudgeTemplate(**SETTINGS["judge"])
    assert backend._clients == {}  # no connection opened
    assert isinstance(registry.open("https://models.example/v1"), VLLMBackend)


def test_a_served_target_loads_without_a_server_and_takes_its_settings(folder: Path) -> None:
    reasoner = Reasoner.from_pretrained(target=URL, settings_from=folder)
    try:
        assert reasoner.target.concurrent and reasoner.draft is None and reasoner.task == "grid"
        assert reasoner.config.verification.mode == "likelihood" and reasoner.config.verification.tau == 0.25
    finally:
        reasoner.close()  # closes the (unused) connection pools on the Reasoner's loop


def test_an_object_is_returned_as_it_is() -> None:
    backend = ScriptedBackend(STEPS)
    assert registry.open(backend) is backend
    assert registry.open(backend, name="ignored", process=True) is backend


# ---------------------------------------------------------------------- capabilities
def test_the_fakes_declare_theirs() -> None:
    blocking = registry.capabilities_of(ScriptedBackend(STEPS, name="d"))
    assert (blocking.concurrent, blocking.repair, blocking.cpu_threads, blocking.release) == (False, False, 0, "none")
    served = registry.capabilities_of(AsyncScriptedBackend(STEPS, name="t"))
    assert (served.concurrent, served.repair, served.release) == (True, True, "none")
    assert served.identity.startswith("fake:t:")


def test_an_identity_is_computed_once_on_first_read_and_copies_keep_it_lazy() -> None:
    calls: list[int] = []

    def identity() -> str:
        calls.append(1)
        return "weights-hash"

    caps = Capabilities(identity=identity, task="grid")
    moved = caps.but(device="cuda:1")
    assert calls == [] and moved.on_gpu and not caps.on_gpu
    assert caps.identity == caps.identity == "weights-hash" and calls == [1]
    assert moved.identity == "weights-hash" and calls == [1, 1]  # its own first read
    assert pickle.loads(pickle.dumps(caps)) == caps  # sent to a parent once computed


class OldStyle(ScriptedBackend):
    """A backend written to the protocol before backends declared their capabilities."""

    capabilities = None  # type: ignore[assignment]
    recommended_verification = {"mode": "judge", "tau": 2.0}  # noqa: RUF012 - as such backends had it
    cpu_threads = 3

    def use_threads(self, n: int) -> None:
        pass

    def shutdown(self) -> None:
        pass


@pytest.mark.asyncio
async def test_a_backend_without_capabilities_is_inferred_from_its_attributes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="dreamr_stream.backends.registry"):
        caps = registry.capabilities_of(OldStyle(STEPS, name="old"))
        registry.capabilities_of(OldStyle(STEPS, name="old"))
    assert sum("declares no capabilities" in r.message for r in caplog.records) == 1  # told once
    assert caps.identity.startswith("fake:old:") and caps.recommended_verification["tau"] == 2.0
    assert (caps.cpu_threads, caps.sets_threads, caps.release, caps.concurrent) == (3, True, "sync", False)
    config = ReasonerConfig(cache=CacheConfig(enabled=False), scheduling=SchedulingConfig(fallback="off"))
    old = Reasoner(OldStyle(STEPS), OldStyle(STEPS), config=config)  # type: ignore[arg-type]  # not the protocol now
    result = await old.ainvoke(IMAGE, "q")
    assert [s.text for s in result.steps] == STEPS


def test_what_is_not_a_backend_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="not a model backend"):
        registry.capabilities_of(object())

    class Wrong(ScriptedBackend):
        capabilities = {"concurrent": True}  # type: ignore[assignment]  # noqa: RUF012

    with pytest.raises(ConfigError, match=r"must be a backends\.base\.Capabilities"):
        registry.capabilities_of(Wrong(STEPS))
    with pytest.raises(ConfigError, match="not a model backend"):
        Reasoner(object())  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the seams
def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            names.update(str(a.value) for a in node.args if isinstance(a, ast.Constant))
    return names


def test_the_backends_and_the_reasoner_import_no_integration_and_only_loading_knows_the_demo() -> None:
    modules = [*sorted((ROOT / "dreamr_stream" / "backends").glob("*.py")), ROOT / "dreamr_stream" / "reasoner.py"]
    imports = {p.name: _imports(p) for p in modules}
    integrations = {
        p: [n for n in names if n.startswith("dreamr_") and n.split(".")[0] != "dreamr_stream"]
        for p, names in imports.items()
    }
    assert {p: names for p, names in integrations.items() if names} == {}
    assert [p for p, names in imports.items() if "dreamr_stream.backends.shipped" in names] == ["loading.py"]
