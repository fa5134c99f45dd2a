"""`dreamr bench`: speed and accuracy of every method side by side, in one process.

Methods run on the same test prompts (the first ``n`` items of a task's test split, the grid
task's unless told), interleaved per prompt in a rotating order so that
machine noise hits all of them alike:

* ``target_only``       our cached decode loop, target writes every step; on a Reasoner with no
                        draft, so it holds every CPU thread (so do the two ``generate()`` rows)
* ``target_generate``   the same target through ``transformers`` ``generate()``
* ``assisted``          HF assisted generation: ``generate(assistant_model=draft)`` (token level,
                        the SAPO draft when there is one)
* ``sequential_sft`` / ``sequential_sapo``   SpecReason's schedule: draft a step, judge it (same
                        TBVM), on a rejection the target rewrites the step; no overlap, so the
                        draft runs in this process (no pipe)
* ``sequential_sapo_repair``  the same schedule repairing rejected steps (``engine.repair``)
* ``fpsr_sft`` / ``fpsr_sapo``   FPSR with the SFT / SAPO draft, as ``Reasoner.from_pretrained``
                        runs it on a CPU: the draft in its own process (``ProcessBackend``),
                        rejected steps repaired
* ``fpsr_sapo_rewrite`` FPSR with rejected steps rewritten whole (``scheduling.repair=False``)
* ``fpsr_sapo_threads`` FPSR with the SAPO draft in a thread of this process (the ablation: its
                        calls and the target's wait for one GIL)
* ``fpsr_sapo_judge`` / ``fpsr_sapo_likelihood``   ``fpsr_sapo`` with TBVM in that mode at the
                        target's tau for it; the row of the recommended mode is ``fpsr_sapo``
                        itself, so the bench runs only the other one
* ``draft_only``        the SFT draft alone, unverified

Faithfulness is the share of a row's right answers whose every step is the reference solution's
step (``faithful``): a right answer reached through a wrong reading or a wrong running result is
a failure that the final answer hides.

A rejected step's cost is the target forwards spent after the verdict to finish it, over the
forwards of writing it whole (one per token): ``rejected_step_cost`` (aggregate over the rows'
rejected steps, from ``Step.cost``).

Ideal speedup (documented formula). With ``t`` the target's seconds per token, ``c`` the draft's
per-token cost as a fraction of ``t``, ``v`` one scoring forward in target-token units, ``L`` the
mean step length in tokens and ``a`` the step acceptance rate, a perfectly pipelined FPSR spends
per step ``max(c*L, v) * t`` while drafts are accepted and additionally ``r * L * t`` (the target
finishing its own step) for the ``1 - a`` rejected ones, against ``L * t`` for target-only, where
``r`` is the measured rejected-step cost (1 for a rewrite, the row's ``rejected_step_cost`` for a
repair); the sequential schedule pays for drafting and scoring one after the other::

    ideal_fpsr       = L / (max(c * L, v) + (1 - a) * r * L)
    ideal_sequential = L / (c * L + v + (1 - a) * r * L)

Efficiency is achieved / ideal, both as aggregates: the speedup in total time over the same
prompts (``speedup_total``), since the ideal comes from aggregate acceptance and step length.
The headline speedup is the median of per-prompt ratios (``speedup_median``), which a typical
prompt sees; with most prompts fully accepted it is above the aggregate.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.backends.process import ProcessBackend
from dreamr_stream.backends.registry import capabilities_of
from dreamr_stream.bench_report import BenchResult, save, to_markdown
from dreamr_stream.config import CacheConfig, ReasonerConfig, VerificationConfig
from dreamr_stream.reasoner import UNVERIFIED_METHODS, Reasoner
from dreamr_stream.tasks import DEFAULT_TASK, Task, TaskItem, TaskLike, as_task

__all__ = [
    "ALL_METHODS",
    "BenchResult",
    "faithful",
    "faithfulness",
    "ideal_speedup",
    "run_bench",
    "save",
    "to_markdown",
]

ALL_METHODS = (
    "target_only",
    "target_generate",
    "assisted",
    "sequential_sft",
    "sequential_sapo",
    "sequential_sapo_repair",
    "fpsr_sft",
    "fpsr_sapo",
    "fpsr_sapo_rewrite",
    "fpsr_sapo_threads",
    "fpsr_sapo_judge",
    "fpsr_sapo_likelihood",
    "draft_only",
)


@dataclass(frozen=True)
class _Engine:
    """How an engine method runs: its draft (None: the target alone, with every CPU thread),
    the Reasoner method, the draft in its own process, rejected steps repaired, TBVM's mode
    (None: the target's recommended one)."""

    draft: str | None
    method: str
    separate: bool = False
    repair: bool = True
    mode: Literal["judge", "likelihood"] | None = None


_ENGINE = {
    "target_only": _Engine(None, "target_only"),
    "draft_only": _Engine("sft", "draft_only"),
    "sequential_sft": _Engine("sft", "sequential", repair=False),
    "sequential_sapo": _Engine("sapo", "sequential", repair=False),
    "sequential_sapo_repair": _Engine("sapo", "sequential"),
    "fpsr_sft": _Engine("sft", "fpsr", separate=True),
    "fpsr_sapo": _Engine("sapo", "fpsr", separate=True),
    "fpsr_sapo_rewrite": _Engine("sapo", "fpsr", separate=True, repair=False),
    "fpsr_sapo_threads": _Engine("sapo", "fpsr"),
    "fpsr_sapo_judge": _Engine("sapo", "fpsr", separate=True, mode="judge"),
    "fpsr_sapo_likelihood": _Engine("sapo", "fpsr", separate=True, mode="likelihood"),
}


def ideal_speedup(
    *, c: float, v: float, step_tokens: float, acceptance: float, overlap: bool = True, rejected_cost: float = 1.0
) -> float:
    L = max(step_tokens, 1e-9)
    speculate = max(c * L, v) if overlap else c * L + v
    return L / (speculate + (1.0 - acceptance) * rejected_cost * L)


@dataclass
class MethodRows:
    tbvm: str | None = None  # "<mode> <tau>" of an engine row that verifies
    wall: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    # per prompt: every step of the answer is the reference's (``faithful``)
    faithful: list[bool] = field(default_factory=list)
    judged: int = 0
    accepted: int = 0
    steps: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    tokens: int = 0
    rejected_forwards: int = 0  # after the verdict, to finish the rejected steps
    rejected_tokens: int = 0  # of those steps: one forward each, written whole


def _q(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]


def _generate_text(
    backend: TransformersBackend, image: Any, question: str, assistant: TransformersBackend | None
) -> tuple[str, int]:
    inputs = backend.prompt_inputs(image, question)
    kwargs: dict[str, Any] = {"max_new_tokens": 400, "do_sample": False}
    if assistant is not None:
        kwargs["assistant_model"] = assistant.model
    with torch.inference_mode():
        out = backend.model.generate(**inputs, **kwargs)
    new = out[0, inputs["input_ids"].shape[1] :]
    return backend.tokenizer.decode(new, skip_special_tokens=True), int(new.numel())


def measure_costs(
    target: TransformersBackend, draft: TransformersBackend, image: Any, question: str
) -> dict[str, float]:
    """Seconds per decoded token of each model and of one 20-token scoring forward (medians)."""

    def per_token(b: TransformersBackend) -> float:
        times = []
        for _ in range(3):
            s = b.open_session(image, question)
            saved, b.eos_ids = b.eos_ids, set()
            t = time.perf_counter()
            b.generate_step(s, max_tokens=24, stop="\x00never")
            times.append((time.perf_counter() - t) / 24)
            b.eos_ids = saved
            b.close(s)
        return statistics.median(times)

    t_tok, d_tok = per_token(target), per_token(draft)
    times = []
    for _ in range(3):
        s = target.open_session(image, question)
        t = time.perf_counter()
        target.score(s, " red" * 20, stop="\n", judge=target.judge)
        times.append(time.perf_counter() - t)
        target.close(s)
    return {
        "target_s_per_token": t_tok,
        "draft_s_per_token": d_tok,
        "score_s": statistics.median(times),
        "c": d_tok / t_tok,
        "v": statistics.median(times) / t_tok,
    }


def run_bench(
    *,
    target_dir: Path,
    sft_dir: Path,
    sapo_dir: Path | None,
    n: int = 50,
    methods: tuple[str, ...] = ALL_METHODS,
    device: str = "cpu",
    tau: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    task: TaskLike = DEFAULT_TASK,
) -> BenchResult:
    """Every method of ``methods`` on the first ``n`` test items of ``task`` (see the module)."""
    target = TransformersBackend.from_pretrained(target_dir, device=device, name="target")
    sft = TransformersBackend.from_pretrained(sft_dir, device=device, name="draft")
    sapo = TransformersBackend.from_pretrained(sapo_dir, device=device, name="draft") if sapo_dir else None
    # the target's recommended TBVM mode and tau (as `Reasoner.from_pretrained` uses); --tau overrides tau
    recommendation = capabilities_of(target).recommended_verification
    recommended = VerificationConfig.recommended(recommendation)
    config = ReasonerConfig(verification=recommended, cache=CacheConfig(enabled=False)).override(tau=tau)
    verification = config.verification
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:
        raise ValueError(f"unknown bench methods {sorted(unknown)}; choose from {', '.join(ALL_METHODS)}")
    methods = tuple(m for m in methods if sapo is not None or _ENGINE.get(m, _Engine(None, "")).draft != "sapo")
    # the recommended mode's row is fpsr_sapo itself
    methods = tuple(m for m in methods if _ENGINE.get(m, _Engine(None, "")).mode != verification.mode)
    drafts: dict[str, tuple[Path, TransformersBackend]] = {"sft": (sft_dir, sft)}
    if sapo is not None and sapo_dir is not None:
        drafts["sapo"] = (sapo_dir, sapo)
    reasoners: dict[_Engine, Reasoner] = {}
    processes: dict[str, ProcessBackend] = {}  # one child per draft, shared by its Reasoners
    for m in ("target_only", *methods):  # the target alone always: it runs the generate() rows too
        engine = _ENGINE.get(m)
        if engine is None or engine in reasoners:
            continue
        backend: TransformersBackend | ProcessBackend | None = None
        if engine.draft is not None:
            folder, backend = drafts[engine.draft]
            if engine.separate and target.device.type == "cpu":  # on a GPU the lanes overlap on CUDA streams
                if engine.draft not in processes:
                    processes[engine.draft] = ProcessBackend.from_pretrained(folder, device=device, name="draft")
                backend = processes[engine.draft]
        groups: dict[str, Any] = {}
        if engine.mode is not None:  # that mode at the target's tau for it
            groups["verification"] = VerificationConfig.recommended(recommendation, mode=engine.mode)
        reasoners[engine] = Reasoner(target, backend, config=config.override(repair=engine.repair, **groups))
    try:
        return _measure(target, sft, sapo, reasoners, methods, config, n, device, progress, as_task(task))
    finally:
        for reasoner in reasoners.values():
            reasoner.close()
        for proc in processes.values():
            proc.shutdown()


def _measure(
    target: TransformersBackend,
    sft: TransformersBackend,
    sapo: TransformersBackend | None,
    reasoners: dict[_Engine, Reasoner],
    methods: tuple[str, ...],
    config: ReasonerConfig,
    n: int,
    device: str,
    progress: Callable[[int, int], None] | None,
    task: Task,
) -> BenchResult:
    alone = reasoners[_ENGINE["target_only"]]
    probe = task.item("val", 0)
    # every torch call runs on a Reasoner's model threads, engine or not (see call_model)
    costs = alone.call_model(measure_costs, target, sft, probe.image, probe.question)
    rows = {m: MethodRows(tbvm=_tbvm(_ENGINE[m], reasoners[_ENGINE[m]]) if m in _ENGINE else None) for m in methods}
    for engine, warm in reasoners.items():  # warm-up every path once
        warm.invoke(probe.image, probe.question, method=engine.method)  # type: ignore[arg-type]
    for i in range(n):
        item = task.item("test", i)
        for m in methods[i % len(methods) :] + methods[: i % len(methods)]:  # rotating order
            if m in ("target_generate", "assisted"):
                helper = (sapo or sft) if m == "assisted" else None
                _run_generate(rows[m], alone, target, item, helper, task)
            else:
                _run_engine(rows[m], reasoners[_ENGINE[m]], _ENGINE[m], target, item, count_all=m == "draft_only")
        if progress:
            progress(i + 1, n)
    cfg = {
        "task": task.name,
        "n": n,
        "device": device,
        "verification": config.verification.model_dump(mode="json"),
        "methods": list(methods),
        "threads": torch.get_num_threads(),
        "assisted_draft": "sapo" if sapo is not None else "sft",
    }
    return BenchResult(config=cfg, costs=costs, methods=_summarise(rows, costs, n))


def _tbvm(engine: _Engine, reasoner: Reasoner) -> str | None:
    """The TBVM an engine row verifies with, as "<mode> <tau>" (None: the row does not verify)."""
    if engine.method in UNVERIFIED_METHODS:
        return None
    v = reasoner.config.verification
    return f"{v.mode} {v.tau:g}"


def _run_generate(
    row: MethodRows,
    alone: Reasoner,
    target: TransformersBackend,
    item: TaskItem,
    helper: TransformersBackend | None,
    task: Task,
) -> None:
    """One ``generate()`` run (assisted when ``helper`` is given), on the target-alone threads."""
    t = time.perf_counter()
    text, tokens = alone.call_model(_generate_text, target, item.image, item.question, helper)
    row.wall.append(time.perf_counter() - t)
    row.correct.append(task.parse_answer(text) == item.answer)
    row.faithful.append(faithful(text.split("\n"), item))
    row.tokens += tokens


def _run_engine(
    row: MethodRows, reasoner: Reasoner, engine: _Engine, target: TransformersBackend, item: TaskItem, count_all: bool
) -> None:
    """One request on the engine, on the Reasoner's own long-lived loop and worker threads, as in a
    service (a fresh anyio.run per request would also pay for new threads and their OpenMP teams).
    Tokens are the answer's (target tokens of its steps), or every token decoded with ``count_all``."""
    r = reasoner.invoke(item.image, item.question, method=engine.method)  # type: ignore[arg-type]
    s = r.stats
    row.wall.append(s.wall_s)
    row.first.append(s.time_to_first_step_s or s.wall_s)
    row.correct.append(r.answer == str(item.answer))
    row.faithful.append(faithful([st.text for st in r.steps], item))
    row.judged += s.draft_steps_judged
    row.accepted += s.draft_steps_accepted
    row.steps += len(r.steps)
    row.target_forwards += s.target_forwards
    row.draft_forwards += s.draft_forwards
    for st in r.steps:
        if st.rejected_draft is not None and st.cost is not None:
            row.rejected_forwards += st.cost.target_forwards
            row.rejected_tokens += st.cost.tokens
    if count_all:
        row.tokens += s.target_tokens + s.draft_tokens
    else:
        row.tokens += sum(len(target.encode(st.text)) + 1 for st in r.steps)


def faithful(steps: list[str], item: TaskItem) -> bool:
    """Every step written is the reference's, in order, and there are as many: a right answer
    reached through a wrong step is not faithful (blank lines and outer spaces aside)."""
    written = [s.strip() for s in steps if s.strip()]
    return written == [s.strip() for s in item.steps]


def faithfulness(correct: list[bool], faithful_steps: list[bool]) -> float | None:
    """The share of right answers whose every step is the reference's (None: no right answer)."""
    right = [f for c, f in zip(correct, faithful_steps, strict=True) if c]
    return sum(right) / len(right) if right else None


def _summarise(rows: dict[str, MethodRows], costs: dict[str, float], n: int) -> dict[str, dict[str, Any]]:
    """Each method's figures, speedups against target-only on the same prompts."""
    base = rows["target_only"].wall if "target_only" in rows else None
    out: dict[str, dict[str, Any]] = {}
    for m, row in rows.items():
        rec: dict[str, Any] = {
            "tbvm": row.tbvm,
            "accuracy": sum(row.correct) / len(row.correct),
            "faithfulness": faithfulness(row.correct, row.faithful),
            "acceptance": row.accepted / row.judged if row.judged else None,
            "steps_per_prompt": row.steps / n if row.steps else None,
            "wall_median_s": statistics.median(row.wall),
            "wall_iqr_s": [_q(row.wall, 0.25), _q(row.wall, 0.75)],
            "first_step_median_s": statistics.median(row.first) if row.first else None,
            "target_forwards_per_prompt": row.target_forwards / n if row.steps else None,
            "draft_forwards_per_prompt": row.draft_forwards / n if row.steps else None,
            "tokens_per_s": row.tokens / sum(row.wall),
            "rejected_step_cost": row.rejected_forwards / row.rejected_tokens if row.rejected_tokens else None,
            "wall_s": row.wall,  # per prompt, in prompt order
        }
        if base is not None:
            rec["speedup_median"] = statistics.median(b / w for b, w in zip(base, row.wall, strict=True))
            # the same prompts' total times: the aggregate that the ideal (from aggregate
            # acceptance and step length) is comparable to
            rec["speedup_total"] = sum(base) / sum(row.wall)
        if rec["acceptance"] is not None and row.steps:
            rec["ideal_speedup"] = ideal_speedup(
                c=costs["c"],
                v=costs["v"],
                step_tokens=row.tokens / max(1, row.steps),
                acceptance=rec["acceptance"],
                overlap=_ENGINE[m].method == "fpsr",
                rejected_cost=rec["rejected_step_cost"] if rec["rejected_step_cost"] is not None else 1.0,
            )
            if "speedup_total" in rec:
                rec["efficiency"] = rec["speedup_total"] / rec["ideal_speedup"]
        out[m] = rec
    return out
