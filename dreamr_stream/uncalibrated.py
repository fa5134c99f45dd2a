"""Telling the user that a served target runs on verification nobody calibrated for it.

A model folder carries its TBVM settings in its ``dreamr.json`` (judge template, mode, tau); a
server does not say them. ``Reasoner.from_pretrained(target=URL, draft=FOLDER)`` without
``settings_from`` therefore verifies with the library's defaults (judge mode, the generic judge
question, tau 1.0), which were measured for no model: on the demo pair over vLLM that ran at
0.42x the served model alone, against 1.37x with the target folder's settings. The answers stay
the target's own (a rejected step is the target's step), so nothing fails: only a warning can
say that the speed-up was left on the table.

What happens, and what deliberately does not:

* a Reasoner whose target is served (``Capabilities.device == "remote"``), that has a draft to
  verify, whose target recommends no verification (no ``settings_from``, no recommendation in
  its settings) and whose own config leaves tau at its default warns once, when it is built:
  an ``UncalibratedVerificationWarning`` pointing at the caller's line, and the same text in
  the log (a server's operator reads logs, not warnings);
* the requests run as asked: refusing them would break a setup that is correct, only slower,
  and a caller who chose a tau (``VerificationConfig(tau=...)``) is not warned;
* nothing is guessed: the draft folder's ``dreamr.json`` names the task and judge template the
  draft was trained with, not a threshold measured on the target's scores (a tau is a ratio of
  the target's probabilities, so it belongs to the target), and it is never read for the target.
  The fix is a settings folder measured on the target itself: ``dreamr calibrate``.

``warnings.simplefilter("error", UncalibratedVerificationWarning)`` turns the warning into an
error, for a deployment that must never run uncalibrated.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from dreamr_stream.backends.base import Capabilities
from dreamr_stream.config import ReasonerConfig, VerificationConfig
from dreamr_stream.errors import UncalibratedVerificationWarning

__all__ = ["DEFAULT_TAU", "uncalibrated", "uncalibrated_message", "warn_uncalibrated"]

log = logging.getLogger("dreamr_stream.reasoner")
DEFAULT_TAU = VerificationConfig().tau
_PACKAGE = str(Path(__file__).resolve().parent)


def uncalibrated(target: Capabilities, config: ReasonerConfig, *, has_draft: bool) -> bool:
    """Whether a Reasoner on ``target`` would verify drafts with settings nobody measured: a
    served target without recommended verification, and a config whose tau is the default."""
    return (
        has_draft
        and target.device == "remote"
        and not target.recommended_verification
        and config.verification.tau == DEFAULT_TAU
    )


def uncalibrated_message(target: Capabilities) -> str:
    """What the warning says: the problem, its cost, and both ways to fix it."""
    served = str(target.identity).removesuffix(":?")  # ":?": the model's name is asked for on the first call
    return (
        f"the served target {served} has no verification settings (no settings_from, and the server "
        f"does not tell them), so TBVM runs on uncalibrated defaults (mode judge, the generic judge question, "
        f"tau {DEFAULT_TAU:g}): drafts are accepted or rejected without evidence that the threshold suits this "
        "model, and FPSR can be slower than the target alone. Pass settings_from=FOLDER (a folder whose "
        "dreamr.json holds the target's judge template and tau; `dreamr reason/serve --target FOLDER`), or "
        "measure them: `dreamr calibrate --target-url URL --draft DRAFT --out FOLDER`, then "
        "settings_from=FOLDER. The draft's own dreamr.json is not the target's calibration and is not used."
    )


def warn_uncalibrated(target: Capabilities, config: ReasonerConfig, *, has_draft: bool) -> bool:
    """Warn (``UncalibratedVerificationWarning``, at the caller's line, and in the log) when
    ``uncalibrated``; returns whether it did. Called once per Reasoner, when it is built."""
    if not uncalibrated(target, config, has_draft=has_draft):
        return False
    message = uncalibrated_message(target)
    log.warning("%s", message)
    warnings.warn(message, UncalibratedVerificationWarning, stacklevel=_caller_level())
    return True


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this package, as seen from
    ``warn_uncalibrated``: the warning names the user's line (``Reasoner.from_pretrained(...)``),
    however many of our frames lie between (``skip_file_prefixes`` needs Python 3.12)."""
    frame = sys._getframe(2)  # 0: here, 1: warn_uncalibrated (stacklevel 1), 2: its caller
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level
