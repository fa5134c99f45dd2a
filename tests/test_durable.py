"""Nothing lost to a crash: model folders are written whole or not at all (an export that stops
halfway leaves the shipped model as it was), checkpoints load as data only, and a JSON-lines log
whose writer was killed mid-line is still read, and appended to, as a crash left it."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from transformers import LlavaProcessor

from dreamr_stream.backends.shipped import WEIGHTS
from dreamr_stream.errors import CorruptFileError
from dreamr_stream.jsonl import open_append, read_jsonl
from dreamr_stream.sapo.config import SapoConfig
from dreamr_stream.sapo.prompts import TrajectoryCache
from dreamr_stream.training import load_checkpoint, save_atomic, save_folder_atomic
from dreamr_stream.zoo.build import ModelShape, build_model
from dreamr_stream.zoo.cards import Stage, sapo_notes
from dreamr_stream.zoo.draft_steps import read_pool
from dreamr_stream.zoo.export import export_model

TORN = '{"step": 3, "loss": 0.'  # a line its writer was killed in the middle of


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Stopped(Exception):
    """What a crash mid-write looks like to the code around it."""


# ---------------------------------------------------------------------------------- model folders
def test_a_folder_written_whole_replaces_the_old_one_and_one_that_stops_leaves_it(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "weights").write_bytes(b"old weights")
    (dest / "only-in-old").write_text("x")
    before = snapshot(dest)

    def stops(folder: Path) -> None:
        (folder / "weights").write_bytes(b"new wei")
        raise Stopped

    with pytest.raises(Stopped):
        save_folder_atomic(stops, dest)
    assert snapshot(dest) == before and [p.name for p in tmp_path.iterdir()] == ["model"]

    def writes(folder: Path) -> None:
        (folder / "sub").mkdir()
        (folder / "weights").write_bytes(b"new weights")
        (folder / "sub" / "config").write_text("{}")

    assert save_folder_atomic(writes, dest) == dest
    assert snapshot(dest) == {"weights": b"new weights", "sub/config": b"{}"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_save_stopped_mid_swap_is_put_back_by_the_next(tmp_path: Path) -> None:
    dest = tmp_path / "final"
    (tmp_path / ".final.old").mkdir()  # renamed aside, and the new folder never renamed in
    (tmp_path / ".final.old" / "weights").write_bytes(b"old")
    (tmp_path / ".final.new").mkdir()  # what the stopped save had written

    def stops(folder: Path) -> None:
        raise Stopped

    with pytest.raises(Stopped):
        save_folder_atomic(stops, dest)
    assert snapshot(dest) == {"weights": b"old"} and [p.name for p in tmp_path.iterdir()] == ["final"]


def test_an_export_that_stops_halfway_leaves_the_shipped_model_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    processor = LlavaProcessor.from_pretrained(WEIGHTS / "target")
    tiny = ModelShape(hidden=8, layers=1, heads=2, intermediate=16, vision_hidden=8)
    build_model(processor.tokenizer, tiny, seed=0).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "shipped"
    export_model(tmp_path / "ckpt", WEIGHTS / "target", out, tau=0.25)
    (out / "README.md").write_text("the card")
    before = snapshot(out)
    build_model(processor.tokenizer, tiny, seed=1).save_pretrained(tmp_path / "ckpt")  # retrained

    def stops(self: LlavaProcessor, folder: Path, **kwargs: object) -> None:
        assert (Path(folder) / "model.safetensors").exists()  # the weights are written by now
        raise Stopped

    with monkeypatch.context() as patch:
        patch.setattr(LlavaProcessor, "save_pretrained", stops)
        with pytest.raises(Stopped):
            export_model(tmp_path / "ckpt", WEIGHTS / "target", out, tau=0.5)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "shipped"]
    export_model(tmp_path / "ckpt", WEIGHTS / "target", out, tau=0.5)
    after = snapshot(out)
    assert after["model.safetensors"] != before["model.safetensors"] and "README.md" not in after
    assert json.loads(after["dreamr.json"])["verification"] == {"tau": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "shipped"]


# ---------------------------------------------------------------------------------- checkpoints
def test_a_trainers_checkpoint_comes_back_loaded_as_data_only(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr_mult": 0.3}], lr=1e-3, betas=(0.9, 0.95))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    rng = random.Random(5)
    rng.random()
    torch_rng = torch.get_rng_state()
    state = {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "rng": rng.getstate(),
        "torch_rng": torch_rng,
        "step": 7,
    }
    save_atomic(state, tmp_path / "state.pt")
    back = load_checkpoint(tmp_path / "state.pt")
    again = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    again.load_state_dict(back["opt"])
    assert again.param_groups[0]["lr_mult"] == 0.3 and back["step"] == 7
    restored = random.Random()
    restored.setstate(back["rng"])
    assert restored.random() == rng.random() and torch.equal(back["torch_rng"], torch_rng)


class Trap:
    """A pickle that runs code when it is loaded: what a planted checkpoint would hold."""

    def __init__(self, mark: Path) -> None:
        self.mark = mark

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.mark),))


def test_a_checkpoint_that_would_run_code_is_refused_before_it_runs(tmp_path: Path) -> None:
    mark = tmp_path / "ran"
    torch.save({"step": 1, "opt": Trap(mark)}, tmp_path / "state.pt")
    with pytest.raises(CorruptFileError, match=r"state\.pt: not a checkpoint of plain data"):
        load_checkpoint(tmp_path / "state.pt")
    assert not mark.exists()


# ---------------------------------------------------------------------------------- JSON lines
def test_a_torn_last_line_is_skipped_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n' + TORN)
    with caplog.at_level(logging.WARNING, logger="dreamr_stream.jsonl"):
        assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: skipping its last line 4, torn by an interrupted write"
    ]
    path.write_bytes('{"text": "Ré"}\n{"text": "R'.encode() + "é".encode()[:1])  # a character cut in two
    assert read_jsonl(path) == [{"text": "Ré"}]


def test_a_bad_line_before_the_last_is_corruption_naming_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n' + TORN + '\n{"step": 3}\n')
    with pytest.raises(CorruptFileError, match=r"log\.jsonl, line 2: not JSON"):
        read_jsonl(path)


def test_appending_after_a_crash_cuts_the_torn_line_so_it_never_lands_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n' + TORN)
    with open_append(path) as f:
        f.write('{"step": 2}\n')
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}')  # whole, but not ended
    with open_append(path) as f:
        f.write('{"step": 2}\n')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    with open_append(tmp_path / "new.jsonl") as f:
        f.write("{}\n")
    assert read_jsonl(tmp_path / "new.jsonl") == [{}]


def test_every_reader_of_a_training_runs_lines_survives_a_torn_last_line(tmp_path: Path) -> None:
    fields = {"split": "train", "index": 7, "hard": True, "k": 1, "text": "x", "correct": False, "draft": "d"}
    (tmp_path / "pool.jsonl").write_text(json.dumps({**fields, "temperature": 1.0}) + "\n" + TORN)
    assert [s.index for s in read_pool(tmp_path / "pool.jsonl")] == [7]
    cache_file = tmp_path / "trajectories.jsonl"
    cache_file.write_text(json.dumps({"key": "a", "steps": ["s"]}) + "\n" + '{"key": "b", "st')
    cache = TrajectoryCache(cache_file)
    assert cache.items == {"a": ["s"]}
    assert cache.get("c", lambda: ["t"]) == ["t"]
    assert TrajectoryCache(cache_file).items == {"a": ["s"], "c": ["t"]}
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(SapoConfig().model_dump()))
    rows = [
        {"step": 1, "reward": 0.3, "kl": 0.0, "s": 60.0},
        {"step": 1, "acceptance": 0.5, "step_tokens": 1.0, "judged": 4},
    ]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + TORN)
    assert "(1 updates, about 1 min" in sapo_notes(run, command="x")
    (run / "log.jsonl").write_text(json.dumps({"step": 10, "s_per_step": 6.0}) + "\n" + TORN)
    assert Stage(config={}, log=run / "log.jsonl", step=10).minutes() == 1.0
