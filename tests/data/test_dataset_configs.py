"""A trainer=debug run on the dataset configs: Stanford 2D-3D-S, DIS5K, Datumaro and the folder
dataset with colour-coded masks on fixtures written in tmp_path, Cityscapes and ADE20K on the real
samples in ../shared/datasets/samples (skipped without them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from segexp.engine.experiment import run_training
from tests.conftest import compose_config
from tests.data.conftest import (
    COLOURS,
    FOLDER_PALETTE,
    write_2d3ds,
    write_colour_folder,
    write_datumaro,
    write_dis5k,
)


# -- a debug training run on every dataset config -------------------------------------------------
def _debug_overrides(name: str, tmp_path: Path) -> list[str]:
    root = tmp_path / name
    if name == "stanford2d3ds":
        write_2d3ds(root, {"area_1": 2, "area_5a": 1})
        return [f"dataset.root={root}", "dataset.allow_missing_areas=true"]
    if name == "dis5k":
        write_dis5k(root)
        return [f"dataset.root={root}"]
    if name == "datumaro":
        write_datumaro(root, {"train": 2, "val": 1}, colour=True, meta={
            "label_map": {"0": "background", "1": "car", "2": "sky"},
            "segmentation_colors": COLOURS})
        return [f"dataset.root={root}", "dataset.num_classes=3"]
    write_colour_folder(root)
    return [f"dataset.root={root}", "dataset.num_classes=3", "dataset.val_fraction=0.25",
            f"dataset.mask_palette={json.dumps(FOLDER_PALETTE).replace(' ', '')}"]


@pytest.mark.parametrize("name", ["stanford2d3ds", "dis5k", "datumaro", "folder"])
def test_dataset_config_runs_with_trainer_debug(name, tmp_path):
    cfg = compose_config(f"dataset={name}", *_debug_overrides(name, tmp_path), "trainer=debug",
                         "dataset.crop_size=[64,64]")
    run_dir = tmp_path / "run"
    run_training(cfg, run_dir)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["iters"] == 2
    expected = {"stanford2d3ds": 14, "dis5k": 2, "datumaro": 3, "folder": 3}[name]
    assert len(summary["best_per_class"]) == expected


def test_debug_training_on_the_real_samples(tmp_path, shared_datasets):
    """trainer=debug on the Cityscapes and ADE20K configs pointed at the real samples."""
    samples = shared_datasets / "samples"
    cityscapes = tmp_path / "cityscapes"  # the sample has a val split only: reuse it for train
    for split in ("train", "val"):
        for top in ("leftImg8bit", "gtFine"):
            shutil.copytree(samples / "cityscapes" / top / "val", cityscapes / top / split)
    runs = {"cityscapes": cityscapes, "ade20k": samples / "ade20k" / "ADEChallengeData2016"}
    for name, root in runs.items():
        run_dir = tmp_path / f"run_{name}"
        run_training(compose_config(f"dataset={name}", f"dataset.root={root}", "trainer=debug",
                                    "trainer.batch_size=1"), run_dir)  # one training image each
        summary = json.loads((run_dir / "metrics.json").read_text())
        assert summary["status"] == "completed", name
        assert len(summary["best_per_class"]) == {"cityscapes": 19, "ade20k": 150}[name]


def test_a_dataset_that_chooses_its_training_split_chooses_its_validation_split_alike():
    """One way to pick splits: every dataset config with dataset.train_split has
    dataset.val_split, and the dataset class takes both."""
    import inspect

    from hydra.utils import get_class

    names = sorted(p.stem for p in (Path(__file__).parents[2] / "conf" / "dataset").glob("*.yaml"))
    with_splits = []
    for name in names:
        dataset = compose_config(f"dataset={name}").dataset
        if "train_split" in dataset:
            with_splits.append(name)
            assert "val_split" in dataset, name
            parameters = inspect.signature(get_class(dataset._target_)).parameters
            assert {"train_split", "val_split"} <= set(parameters), name
    assert {"ade20k", "camvid", "cityscapes", "dis5k", "folder", "kitti", "voc"} <= set(with_splits)
