"""Export a trained checkpoint as a shipped demo model: bf16 safetensors + processor + sidecar."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

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
) -> Path:
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    processor = LlavaProcessor.from_pretrained(processor_dir)
    if out.exists():
        shutil.rmtree(out)
    model.to(dtype=torch.bfloat16).save_pretrained(out, safe_serialization=True)  # type: ignore[call-arg]
    processor.save_pretrained(out)
    sidecar: dict[str, object] = {"judge": {"suffix": JUDGE_SUFFIX, "positive": JUDGE_POS, "negative": JUDGE_NEG}}
    verification: dict[str, object] = {}
    if verify_mode is not None:
        verification["mode"] = verify_mode
    if tau is not None:
        verification["tau"] = tau
    if verification:  # what `Reasoner.from_pretrained` uses when no config is given
        sidecar["verification"] = verification
    (out / "dreamr.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    if card is not None:
        (out / "README.md").write_text(card)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Export a checkpoint as a shipped demo model (bf16).")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--processor", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--verify", choices=["judge", "likelihood"], help="verification mode to recommend")
    parser.add_argument("--tau", type=float, help="TBVM threshold to recommend")
    args = parser.parse_args(argv)
    print(export_model(args.checkpoint, args.processor, args.out, verify_mode=args.verify, tau=args.tau))


if __name__ == "__main__":
    main()
