"""``dreamr calibrate``: TBVM's mode and tau measured for a target, written as a settings folder.

A model folder made by the zoo carries the verification measured for it (``dreamr.json``,
``zoo.export``); a model on a server carries nothing, and a Reasoner on it verifies with
uncalibrated defaults (``dreamr_stream.uncalibrated``). This measures what the folder would have
said, against the target itself, on held-out items of the task (the val split; the test split
stays for reporting):

1. score labelled candidates with the target (``zoo.calibration_items``: the judge set, and with
   a draft its greedy steps at the prefixes of the target's own trajectories), in every TBVM mode
   the target supports (``Capabilities.evidence``);
2. choose each mode's tau with ``tbvm_eval.choose_tau`` (the one tau chooser: most verdicts
   matching the labels, ties to the lowest tau), and the mode whose chosen tau agrees best
   (ties: fewer false accepts, then judge mode, which a server answers from its prefix cache);
3. write ``dreamr.json`` (task, the judge template scored with, ``verification`` with the chosen
   mode, its tau and every mode's ``taus``: ``backends.settings``' format, so
   ``settings_from=FOLDER`` reads it) and ``calibration.json`` (the figures behind the choice),
   whole or not at all (``training.save_folder_atomic``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from dreamr_stream.backends import registry
from dreamr_stream.backends.registry import Backend, is_url
from dreamr_stream.backends.settings import SETTINGS_FILE, ModelSettings
from dreamr_stream.config import GenerationConfig, JudgeTemplate
from dreamr_stream.engine.runner import ModelRunner
from dreamr_stream.engine.threads import split_threads
from dreamr_stream.errors import BackendError, ConfigError, DreamrError
from dreamr_stream.tasks import DEFAULT_TASK, Split, Task, get_task
from dreamr_stream.training import save_folder_atomic
from dreamr_stream.zoo.calibration_items import Progress, Scored, draft_steps, judge_set, labelled
from dreamr_stream.zoo.tbvm_eval import MODES, TbvmReport, choose_tau, tbvm_report

__all__ = [
    "CALIBRATION_FILE",
    "CALIBRATION_SPLIT",
    "Calibration",
    "ModeResult",
    "calibrate",
    "check_out",
    "choose",
    "measure",
    "write_settings",
]

CALIBRATION_SPLIT: Split = "val"  # held out from training, and never the test split the figures are reported on
CALIBRATION_FILE = "calibration.json"
_WRITTEN = frozenset({SETTINGS_FILE, CALIBRATION_FILE})  # what a settings folder holds


@dataclass(frozen=True)
class ModeResult:
    """One TBVM mode at its chosen tau: on every item (what the tau was chosen on), and on each set."""

    mode: str
    tau: float
    overall: TbvmReport
    judge_set: TbvmReport | None
    draft_steps: TbvmReport | None

    @property
    def draft_acceptance(self) -> float | None:
        """The share of the draft's steps accepted, right or wrong: what FPSR's speed follows."""
        r = self.draft_steps
        if r is None or r.n == 0:
            return None
        return (r.recall * r.right + r.false_accept * (r.n - r.right)) / r.n


@dataclass(frozen=True)
class Calibration:
    """What was measured for a target and what was chosen (``mode``, and its ``tau``)."""

    target: str
    draft: str | None
    task: str
    judge: JudgeTemplate
    results: dict[str, ModeResult]
    mode: str
    judge_items: int
    draft_items: int

    @property
    def tau(self) -> float:
        return self.results[self.mode].tau

    def settings(self) -> ModelSettings:
        """The ``dreamr.json`` that applies this calibration (``settings_from``)."""
        taus = {m: r.tau for m, r in self.results.items()}
        return ModelSettings(
            task=self.task, judge=self.judge, verification={"mode": self.mode, "tau": self.tau, "taus": taus}
        )

    def record(self) -> dict[str, Any]:
        """The figures behind the choice, for ``calibration.json`` (NaN written as null)."""
        return _finite(
            {
                "target": self.target,
                "draft": self.draft,
                "task": self.task,
                "split": CALIBRATION_SPLIT,
                "judge_items": self.judge_items,
                "draft_items": self.draft_items,
                "chosen": {"mode": self.mode, "tau": self.tau},
                "modes": {m: {**asdict(r), "draft_acceptance": r.draft_acceptance} for m, r in self.results.items()},
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def choose(
    items: Sequence[Scored], modes: Sequence[str], *, mode: str | None = None
) -> tuple[str, dict[str, ModeResult]]:
    """Each mode's tau (``choose_tau`` on every item) and the mode to recommend: ``mode`` when
    given, else the one whose verdicts agree best with the labels (ties: fewer false accepts,
    then judge mode)."""
    results: dict[str, ModeResult] = {}
    for m in modes:
        tau = choose_tau(labelled(items, m), m)

        def on(source: str | None, m: str = m, tau: float = tau) -> TbvmReport | None:
            chosen = labelled(items, m, source)  # type: ignore[arg-type]
            return tbvm_report(chosen, m, tau) if chosen else None

        overall = on(None)
        assert overall is not None  # measure() refuses to return no items
        results[m] = ModeResult(m, tau, overall, on("judge set"), on("draft"))
    if mode is None:
        mode = max(
            results, key=lambda m: (results[m].overall.agreement, -results[m].overall.false_accept, m == "judge")
        )
    return mode, results


async def measure(
    target: ModelRunner,
    draft: ModelRunner | None,
    task: Task,
    *,
    n: int,
    modes: Sequence[str],
    seed: int = 0,
    progress: Progress | None = None,
) -> list[Scored]:
    """The judge set's ``n`` items and, with a draft, its steps on ``n`` items of the val split,
    scored by the target in ``modes``."""
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    items = [x async for x in judge_set(target, task, n=n, modes=modes, split=CALIBRATION_SPLIT, seed=seed)]
    if progress is not None:
        progress(f"judge set: {n} items")
    if draft is not None:
        gen = GenerationConfig()
        steps = draft_steps(target, draft, task, n=n, modes=modes, split=CALIBRATION_SPLIT, gen=gen, progress=progress)
        items += [x async for x in steps]
    return items


def _open(spec: str | Path, name: str, device: str, judge_from: str | Path | None) -> Backend:
    if judge_from is not None and not is_url(spec):
        raise ConfigError("a judge template from another folder applies to a served target; a model folder has its own")
    return registry.open(spec, name=name, device=device, settings_from=judge_from)


async def _reach(backend: Backend, task: Task, where: str) -> None:
    """One session opened on the served target (which asks the server for its model), or a
    ``BackendError`` saying the server at ``where`` cannot be reached."""
    runner = ModelRunner(backend, "target")
    item = task.item(CALIBRATION_SPLIT, 0)
    try:
        runner.close(await runner.open_session(item.image, item.question))
    except DreamrError as e:
        raise BackendError(f"cannot reach the target at {where} (is its server running?): {e}") from e
    finally:
        await registry.aclose(backend)  # its connections belong to this event loop


def calibrate(
    target: str | Path,
    *,
    draft: str | Path | None = None,
    task: str = DEFAULT_TASK,
    n: int = 32,
    mode: str | None = None,
    judge_from: str | Path | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: Progress | None = None,
) -> Calibration:
    """Measure TBVM for ``target`` (a served model's URL, or a model folder computed here) on
    ``n`` val items of ``task`` (and ``draft``'s steps on ``n`` more, if given) and choose each
    mode's tau and the mode (``mode`` forces it). ``judge_from``: a folder whose ``dreamr.json``
    judge template a served target is asked with (default: the library's generic question).
    Write the result with ``write_settings``."""
    chosen_task = get_task(task)  # an unknown task is refused before any model loads
    if mode is not None and mode not in MODES:
        raise ConfigError(f"unknown verification mode {mode!r}; choose one of {', '.join(MODES)}")
    t = _open(target, "target", device, judge_from)
    caps = registry.capabilities_of(t)
    if caps.concurrent:  # a server: reached once before a draft loads, so a wrong URL fails at once
        anyio.run(_reach, t, chosen_task, str(target))
    d = _open(draft, "draft", device, None) if draft is not None else None
    owned = [b for b in (t, d) if b is not None]
    modes = [m for m in MODES if m in caps.evidence]
    if mode is not None and mode not in modes:
        raise ConfigError(f"the target supports {', '.join(modes)} verification, not {mode}")

    # the Reasoner's split of this CPU's threads: two models' OpenMP teams in the worker threads
    # would spin against each other between calls (``engine.threads``)
    t_threads, d_threads = split_threads(caps, registry.capabilities_of(d) if d is not None else None)

    async def run() -> list[Scored]:
        try:
            t_runner = ModelRunner(t, "target", t_threads)
            d_runner = ModelRunner(d, "draft", d_threads) if d is not None else None
            return await measure(t_runner, d_runner, chosen_task, n=n, modes=modes, seed=seed, progress=progress)
        finally:
            for backend in owned:
                await registry.aclose(backend)

    try:
        items = anyio.run(run)
    finally:
        for backend in owned:
            registry.shutdown(backend)
    chosen, results = choose(items, modes, mode=mode)
    return Calibration(
        target=str(target) if is_url(target) else str(caps.identity),
        draft=str(draft) if draft is not None else None,
        task=chosen_task.name,
        judge=t.judge,
        results=results,
        mode=chosen,
        judge_items=sum(x.source == "judge set" for x in items),
        draft_items=sum(x.source == "draft" for x in items),
    )


def check_out(out: Path, *, force: bool) -> None:
    """Refuse an ``out`` that exists (unless ``force``), and always one holding anything but a
    settings folder's files: replacing it would delete them (a model folder's weights)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    others = sorted(p.name for p in out.iterdir() if p.name not in _WRITTEN)
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ConfigError(f"{out} holds {shown}: not a settings folder; write the settings to a folder of their own")
    if not force:
        raise ConfigError(f"{out} exists; pass --force (force=True) to replace its settings")


def write_settings(calibration: Calibration, out: str | Path, *, force: bool = False) -> Path:
    """Write ``dreamr.json`` and ``calibration.json`` to the folder ``out``, whole or not at all."""
    folder = Path(out)
    check_out(folder, force=force)

    def write(tmp: Path) -> None:
        (tmp / SETTINGS_FILE).write_text(json.dumps(calibration.settings().to_dict(), indent=2) + "\n")
        (tmp / CALIBRATION_FILE).write_text(json.dumps(calibration.record(), indent=2) + "\n")

    return save_folder_atomic(write, folder)
