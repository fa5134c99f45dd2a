"""The shipped models' cards are what their committed eval reports and card specs give."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dreamr_stream.backends.shipped import WEIGHTS
from dreamr_stream.zoo.cards import MODELS, RESULTS, card_from_spec, main


def test_the_shipped_cards_are_written_from_the_committed_eval_reports() -> None:
    assert main(["--check"]) == 0


def test_a_card_follows_its_eval_report(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results, ignore=shutil.ignore_patterns("*.png"))
    report = json.loads((results / "zoo_eval_draft-sapo.json").read_text())
    report["fpsr"]["accuracy"] = 0.5
    (results / "zoo_eval_draft-sapo.json").write_text(json.dumps(report))
    card = card_from_spec("draft-sapo", results=results)
    assert '"accuracy": 0.5' in card and card != (WEIGHTS / "draft-sapo" / "README.md").read_text()
    assert all(card_from_spec(m) == (WEIGHTS / m / "README.md").read_text() for m in MODELS)
