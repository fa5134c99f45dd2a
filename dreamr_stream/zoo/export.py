"""Export a trained checkpoint as a shipped demo model: bf16 safetensors + processor + sidecar.

The sidecar (``dreamr.json``) says which task the model was trained on (``"task"``), its judge
prompt and the verification it recommends.

The folder is written beside the one it replaces and swapped in by rename
(``training.save_folder_atomic``): an export that stops halfway leaves the shipped model as it was."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from dreamr_stream.tasks import DEFAULT_TASK, get_task, task_names
from dreamr_stream.training import save_folder_atomic
from dreamr_stream.zoo.build import JUDGE_NEG, JUDGE_POS, JUDGE_SUFFIX

__all__ = ["export_model"]


def export_model(
    checkpoint: Path,
    processor_dir: Path,
    out: Path,
    *,
    card: str | None = None,
    verify_mode: str | None = None,
    tau: float | None = None,
    taus: dict[str, float] | None = None,
    task: str = DEFAULT_TASK,
) -> Path:
    """Write ``checkpoint`` as a shipped model folder; ``verify_mode`` and ``tau`` are the TBVM it
    recommends, ``taus`` the tau measured for each mode (``VerificationConfig.recommended``),
    ``task`` the task it was trained on (a known one: ``tasks.get_task``)."""
    task = get_task(task).name  # an unknown task is refused before anything is written
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    processor = LlavaProcessor.from_pretrained(processor_dir)
    sidecar: dict[str, object] = {
        "task": task,
        "judge": {"suffix": JUDGE_SUFFIX, "positive": JUDGE_POS, "negative": JUDGE_NEG},
    }
    verification: dict[str, object] = {}
    if verify_mode is not None:
        verification["mode"] = verify_mode
    if tau is not None:
        verification["tau"] = tau
    if taus:
        verification["taus"] = taus
    if verification:  # what `Reasoner.from_pretrained` uses when no config is given
        sidecar["verification"] = verification

    def write(folder: Path) -> None:
        model.to(dtype=torch.bfloat16).save_pretrained(folder, safe_serialization=True)  # type: ignore[call-arg]
        processor.save_pretrained(folder)
        (folder / "dreamr.json").write_text(json.dumps(sidecar, indent=2) + "\n")
        if card is not None:
            (folder / "README.md").write_text(card)

    return save_folder_atomic(write, out)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Export a checkpoint as a shipped demo model (bf16).")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--processor", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--task", default=DEFAULT_TASK, choices=task_names(), help="the task it was trained on")
    parser.add_argument("--verify", choices=["judge", "likelihood"], help="verification mode to recommend")
    parser.add_argument("--tau", type=float, help="TBVM threshold to recommend")
    parser.add_argument(
        "--taus", default="", help="each mode's measured tau, e.g. judge=1.33,likelihood=0.25 (--tau: --verify's)"
    )
    args = parser.parse_args(argv)
    taus = {}
    for part in filter(None, args.taus.split(",")):
        mode, _, value = part.partition("=")
        if mode not in ("judge", "likelihood") or not value:
            parser.error(f"--taus: expected mode=tau with mode judge or likelihood, got {part!r}")
        taus[mode] = float(value)
    tau = args.tau if args.tau is not None else taus.get(args.verify) if args.verify else None
    out = export_model(
        args.checkpoint, args.processor, args.out, verify_mode=args.verify, tau=tau, taus=taus, task=args.task
    )
    print(out)


if __name__ == "__main__":
    main()
