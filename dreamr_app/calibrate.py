"""``dreamr calibrate``: measure TBVM's tau for a target (served or a local folder) and write a
settings folder that ``settings_from`` / ``--target`` applies.

Bad input (no target, an unknown task, an ``--out`` that exists without ``--force`` or holds other
files, a missing folder) is one line before any model loads; a server that cannot be reached is
one line naming its URL before the draft loads (``zoo.calibrate.calibrate`` asks it first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dreamr_app.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError

if TYPE_CHECKING:
    from dreamr_stream.zoo.calibrate import Calibration

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``dreamr calibrate``'s flags (``--task`` is added by the caller, as for every command)."""
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target-url", help="the target served by vLLM (http://host:8000/v1)")
    where.add_argument("--target", help="a local target model folder, computed in this process")
    p.add_argument("--draft", help="the draft model folder (or URL): its steps are what TBVM judges in FPSR")
    p.add_argument(
        "-n", type=int, default=32, help="val items for the judge set, and as many for the draft's steps (default: 32)"
    )
    p.add_argument("--out", required=True, help="the settings folder to write (dreamr.json, calibration.json)")
    p.add_argument("--force", action="store_true", help="replace the settings in an existing --out")
    p.add_argument("--mode", choices=["judge", "likelihood"], help="recommend this mode (default: the best measured)")
    p.add_argument(
        "--judge-from",
        help="with --target-url: a folder whose dreamr.json judge template the target is asked with "
        "(default: the generic question 'Is this step correct? Answer yes or no:')",
    )
    p.add_argument("--device", default="cpu", help="where a local target and draft compute")


def _check(args: argparse.Namespace) -> None:
    """Every input error, before any model loads."""
    from dreamr_stream.errors import ConfigError
    from dreamr_stream.zoo.calibrate import check_out

    if args.n < 1:
        raise UsageError(f"-n must be at least 1, got {args.n}")
    if args.judge_from and not args.target_url:
        raise UsageError("--judge-from applies to --target-url; a --target folder has its own judge template")
    for flag, value in (("--target", args.target), ("--draft", args.draft), ("--judge-from", args.judge_from)):
        if value and not value.startswith(("http://", "https://")) and not Path(value).is_dir():
            raise UsageError(f"{flag} {value}: no such folder")
    if args.target_url and not args.target_url.startswith(("http://", "https://")):
        raise UsageError(f"--target-url {args.target_url}: not a server URL (expected http://host:port/v1)")
    try:
        check_out(Path(args.out), force=args.force)
    except ConfigError as e:
        raise UsageError(f"--out: {e}") from e


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def report(c: Calibration, out: Path, target: str, draft: str | None) -> str:
    """What was measured, what was chosen and how to use it, for the terminal."""
    counts = f"{c.judge_items} judge items" + (f" and {c.draft_items} draft steps" if c.draft_items else "")
    lines = [f"TBVM measured for {target} on {counts} ({c.task}, val split)"]
    lines.append(
        f"  {'mode':<11}{'tau':>8}  {'right accepted':>14}  {'wrong accepted':>14}  {'agreement':>9}  draft accepted"
    )
    for mode, r in c.results.items():
        mark = "  <- chosen" if mode == c.mode else ""
        lines.append(
            f"  {mode:<11}{r.tau:>8.4g}  {_pct(r.overall.recall):>14}  {_pct(r.overall.false_accept):>14}  "
            f"{_pct(r.overall.agreement):>9}  {_pct(r.draft_acceptance):>14}{mark}"
        )
    if "judge" in c.results and c.results["judge"].overall.recall == 0.0:
        lines.append(
            "  judge mode accepted no right step at its best tau: the target may not answer the judge template's "
            "verdict tokens (--judge-from a folder with the template it was trained on)"
        )
    lines.append(f"wrote {out}/dreamr.json and {out}/calibration.json (every figure, per set)")
    is_url = target.startswith(("http://", "https://"))
    draft_arg = f', draft="{draft}"' if draft else ""
    if is_url:
        lines.append(f'use it: Reasoner.from_pretrained(target="{target}"{draft_arg}, settings_from="{out}")')
        lines.append(
            f"        dreamr reason --target-url {target} --target {out}" + (f" --draft {draft}" if draft else "")
        )
    else:
        lines.append(f'use it: Reasoner.from_pretrained(target=URL serving {target}{draft_arg}, settings_from="{out}")')
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``dreamr calibrate``: check the input, measure, write the settings folder, say what was chosen."""
    from dreamr_stream.errors import DreamrError

    try:
        _check(args)
    except UsageError as e:
        print(f"dreamr calibrate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    from dreamr_stream.zoo.calibrate import calibrate, write_settings

    target = args.target_url or args.target
    try:
        c = calibrate(
            target,
            draft=args.draft,
            task=args.task,
            n=args.n,
            mode=args.mode,
            judge_from=args.judge_from,
            device=args.device,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
        out = write_settings(c, Path(args.out), force=args.force)
    except DreamrError as e:
        print(f"dreamr calibrate: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(report(c, out, target, args.draft))
    return EXIT_OK
