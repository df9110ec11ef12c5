"""Every file a run writes appears whole or not at all; a full disk or an unwritable folder is a
message naming the folder, and leaves no temporary file and the previous version intact."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import uuid

import pytest
import torch

from segexp import atomic
from segexp.engine.checkpoint import save_checkpoint
from segexp.engine.experiment import run_training
from segexp.errors import StorageError
from segexp.weights_io import read_weights_file
from tests.conftest import compose_config, tiny_config, train_py


def _full_disk(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"iter": 1}, path)

    def partial_then_full(state, f):  # writes some bytes, then the disk fills up
        open(f, "wb").write(b"x" * 1000)
        _full_disk()

    monkeypatch.setattr(torch, "save", partial_then_full)
    with pytest.raises(StorageError, match="full") as info:
        save_checkpoint({"iter": 2}, path)
    assert str(path.parent) in str(info.value) and "free" in str(info.value)
    monkeypatch.undo()
    assert read_weights_file(path)["iter"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file


def test_json_and_text_are_replaced_whole(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic.write_json(path, {"status": "running"})
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", _full_disk)
    with pytest.raises(StorageError):
        atomic.write_json(path, {"status": "completed"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads(path.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_unwritable_folder_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(StorageError, match="does not exist") as info:
        atomic.write_text(blocker / "sub" / "metrics.json", "{}")
    assert "hydra.run.dir" in str(info.value)


def test_an_impossible_run_folder_is_one_line_not_a_traceback(tmp_path, capsys):
    """Hydra creates the run folder before train.py's own error handling starts."""
    from omegaconf import OmegaConf

    from segexp.config import OutputFolderCheck

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = train_py("trainer=debug", f"hydra.run.dir={blocker / 'run'}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"segexp: error: cannot write the run folder {blocker / 'run'} (Not a directory: "
        f"{blocker / 'run'}). Choose a writable folder with hydra.run.dir=<path>."]
    # A sweep's folder, checked by the same callback when -m starts.
    with pytest.raises(SystemExit) as exited:
        OutputFolderCheck().on_multirun_start(OmegaConf.create(
            {"hydra": {"sweep": {"dir": str(blocker / "sweep")}}}))
    assert exited.value.code == 1
    assert "Choose a writable folder with hydra.sweep.dir=<path>." in capsys.readouterr().err


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 256 KB file system (tmpfs), where this machine lets us mount one."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); the simulated ENOSPC tests cover it")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_run_on_a_full_disk_says_so_and_leaves_no_temporary_files(tiny_disk):
    # The tiny FCN's checkpoint (about 2 MB with its optimizer state) cannot fit in 256 KB.
    with pytest.raises(StorageError, match="full"):
        run_training(tiny_config("trainer.max_iters=1", "trainer.val_interval=1",
                                 "trainer.measure_speed=false"), tiny_disk / "run")
    leftovers = [p for p in tiny_disk.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_a_refused_resume_loses_no_config(tmp_path):
    """A resume into a finished run with a wrong override is refused; Hydra has already rewritten
    .hydra/config.yaml, but the first run's config is kept and evaluation still uses the config
    the weights were trained with."""
    from segexp.inference import Segmenter, load_run_config

    common = ["trainer=debug", "model=fcn", "head.channels=16", "dataset.image_size=32",
              "trainer.measure_speed=false", f"hydra.run.dir={tmp_path}"]
    assert train_py(*common).returncode == 0
    refused = train_py(*common, "model=pspnet", "resume=true")
    assert refused.returncode == 1 and "does not fit this model" in refused.stderr
    history = sorted((tmp_path / ".hydra" / "history").iterdir())
    assert len(history) == 2  # the first run's files and the refused resume's
    assert "FCNHead" in (history[0] / "config.yaml").read_text()
    assert "PSPHead" in (tmp_path / ".hydra" / "config.yaml").read_text()  # Hydra's rewrite
    assert "FCNHead" in str(load_run_config(tmp_path).head._target_)
    segmenter = Segmenter.from_run(tmp_path, checkpoint="last", device="cpu")
    assert type(segmenter.model.decode_head).__name__ == "FCNHead"


def test_resume_with_no_overrides_uses_the_runs_own_config(tmp_path):
    """The first run used options that are not the defaults; `resume=true` alone (plus a longer
    trainer.max_iters) continues that run, not a run of today's defaults."""
    from segexp.cli.train import hydra_launch

    first = ["trainer=debug", "model=fcn", "head.channels=16", "dataset.image_size=32",
             "trainer.max_iters=2", "trainer.measure_speed=false"]
    run_training(compose_config(*first), tmp_path)
    resumed = compose_config(f"hydra.run.dir={tmp_path}", "resume=true", "trainer.max_iters=4")
    assert resumed.head._target_.endswith("UNetHead")  # what the defaults would build
    run_training(resumed, tmp_path, hydra_launch())  # train.py's command line: resume alone
    saved = read_weights_file(tmp_path / "checkpoints" / "last.pt")
    assert saved["state"]["iter"] == 4
    assert "FCNHead" in saved["config"] and "channels: 16" in saved["config"]
