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
from typing import TYPE_CHECKING, Literal

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
    s = p.add_argument_group("--schedule: how far the draft runs ahead at each load, measured against a served target")
    s.add_argument(
        "--schedule",
        action="store_true",
        help="measure the speculation schedule (FPSR over --target-url at each load, every lookahead) and write it, "
        "with --settings' TBVM settings, to --out",
    )
    s.add_argument(
        "--settings",
        help="the settings folder FPSR runs with (what dreamr calibrate wrote, or the folder the server was started "
        "on); --out may be the same folder",
    )
    s.add_argument("--levels", default="1,2,4,8,16,32", help="requests in flight to measure (default: 1,2,4,8,16,32)")
    s.add_argument(
        "--lookaheads", default="0,1,2,3", help="lookaheads to try; 0 is the target alone (default: 0,1,2,3)"
    )
    s.add_argument("--rounds", type=int, default=1, help="rounds per load and lookahead (default: 1)")


def _ints(flag: str, text: str, least: int) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError as e:
        raise UsageError(f"{flag} {text}: expected numbers separated by commas") from e
    if any(v < least for v in values) or values != sorted(set(values)):
        raise UsageError(f"{flag} {text}: expected increasing numbers from {least}")
    return values


def _check_schedule(args: argparse.Namespace) -> None:
    if not args.target_url:
        raise UsageError("--schedule measures a served target: give --target-url")
    if args.settings is None or not Path(args.settings).is_dir():
        raise UsageError(f"--schedule needs --settings FOLDER with the target's TBVM settings (got {args.settings!r})")
    if args.draft and not args.draft.startswith(("http://", "https://")) and not Path(args.draft).is_dir():
        raise UsageError(f"--draft {args.draft}: no such folder")
    if args.rounds < 1 or args.n < 1:
        raise UsageError("-n and --rounds must be at least 1")
    out = Path(args.out)
    if out.exists() and out.resolve() != Path(args.settings).resolve() and not args.force:
        raise UsageError(f"--out {out} exists; pass --force to replace it (or write to --settings' own folder)")
    args.levels = _ints("--levels", args.levels, 1)
    args.lookaheads = _ints("--lookaheads", args.lookaheads, 0)


def _check(args: argparse.Namespace) -> None:
    """Every input error, before any model loads."""
    from dreamr_stream.errors import ConfigError
    from dreamr_stream.zoo.calibrate import check_out

    if args.schedule:
        _check_schedule(args)
        return
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
    if args.schedule:
        return _run_schedule(args)
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


def _run_schedule(args: argparse.Namespace) -> int:
    """``dreamr calibrate --schedule``: FPSR over the served target at every load and lookahead,
    the rows chosen, written with the settings."""
    import anyio

    from dreamr_stream.backends.settings import read_settings
    from dreamr_stream.backends.shipped import demo_paths
    from dreamr_stream.errors import DreamrError
    from dreamr_stream.reasoner import Reasoner
    from dreamr_stream.zoo.calibrate_schedule import measure_schedule, write_schedule

    draft = args.draft or demo_paths(task=args.task).draft
    taus = read_settings(args.settings).verification.get("taus") or {}
    # where the folder measured both modes, try both
    modes: list[Literal["judge", "likelihood"] | None] = sorted(taus) if len(taus) > 1 else [None]
    try:
        reasoner = Reasoner.from_pretrained(target=args.target_url, draft=draft, settings_from=args.settings)
        try:
            c = anyio.run(
                lambda: measure_schedule(
                    reasoner,
                    task=args.task,
                    n=args.n,
                    levels=args.levels,
                    lookaheads=args.lookaheads,
                    modes=modes,
                    rounds=args.rounds,
                    progress=lambda line: print(line, file=sys.stderr, flush=True),
                )
            )
        finally:
            reasoner.close()
        out = write_schedule(c, args.out, settings_from=args.settings)
    except DreamrError as e:
        print(f"dreamr calibrate: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"speculation schedule for {args.target_url} ({c.items} {c.task} val items per load and lookahead):")
    below = 0
    for row in c.rows:
        upto = f"up to {row.in_flight} in flight"
        if row.in_flight >= 1_000_000:
            upto = f"above {below} in flight" if below else "at any load"
        below = row.in_flight
        what = "the target alone" if row.lookahead == 0 else f"lookahead {row.lookahead}"
        print(f"  {upto}: {what}" + (f", {row.mode} verification" if row.mode else ""))
    print(f"wrote {out}/dreamr.json (with the schedule) and {out}/schedule.json (every figure)")
    print(f'use it: Reasoner.from_pretrained(target="{args.target_url}", draft=..., settings_from="{out}")')
    return EXIT_OK
