"""segexp.data.prepare, what every scripts/prepare/*.py shares: downloads that restart a partial
file, value lists in words, and a failure on the command line as one message; and
scripts/prepare/stanford2d3ds.py and scripts/prepare/dis5k.py on local archives (those of
Cityscapes and ADE20K are tested in test_cityscapes.py and test_ade20k.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from segexp.data import prepare
from segexp.errors import DataError
from tests.conftest import ROOT, load_script
from tests.data.conftest import (
    LABELS_2D3DS,
    file_url,
    photo,
    write_2d3ds,
    write_dis5k,
    write_grey_image,
    write_rgb_image,
)


def test_download_resumes_or_restarts_a_partial_file(tmp_path):
    load_script("prepare/ade20k")
    common = prepare
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 100)
    dest = tmp_path / "downloads" / "file.bin"
    dest.parent.mkdir()
    (tmp_path / "downloads" / "file.bin.part").write_bytes(b"garbage")  # left by a failed run
    assert common.download(file_url(source), dest) == dest
    assert dest.read_bytes() == source.read_bytes()  # file:// ignores Range: started again
    assert not (tmp_path / "downloads" / "file.bin.part").exists()
    source.write_bytes(b"changed")
    common.download(file_url(source), dest)  # already there: skipped
    assert len(dest.read_bytes()) == 25600
    with pytest.raises(common.PrepareError, match="downloading .* failed"):
        common.download(file_url(tmp_path / "missing.bin"), tmp_path / "downloads" / "x.bin")
    assert common.describe([0, 1, 2, 3, 7, 8, 10, 255]) == "0..3, 7, 8, 10, 255"


def test_prepare_script_cli_failure_is_one_message(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEGEXP_DATA": str(tmp_path / "data")}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare" / "ade20k.py"), "--src",
                             str(tmp_path / "downloads"), "--no-download"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("segexp: error: ") and "Traceback" not in result.stderr
    assert "ADEChallengeData2016.zip" in result.stderr and "data.csail.mit.edu" in result.stderr


# -- prepare scripts ---------------------------------------------------------------------------
def test_prepare_stanford2d3ds_extracts_and_verifies(tmp_path, capsys):
    script = load_script("prepare/stanford2d3ds")
    staging, src, dst = tmp_path / "staging", tmp_path / "src", tmp_path / "data" / "s3d"
    write_2d3ds(staging, {"area_1": 2, "area_5a": 1}, labels=False, past_end=False)
    src.mkdir()
    for area in ("area_1", "area_5a"):
        with tarfile.open(src / f"{area}_no_xyz.tar", "w") as tar:
            tar.add(staging / area, arcname=area)
    args = ["--src", str(src), "--dst", str(dst), "--no-download"]
    with pytest.raises(DataError, match="semantic_labels.json"):  # not in the archives
        script.main(args)
    (src / "semantic_labels.json").write_text(json.dumps(LABELS_2D3DS))
    assert script.main(args) == 0
    out = capsys.readouterr().out
    assert (dst / "area_1" / "data" / "rgb").is_dir() and (dst / "assets" / "semantic_labels.json").is_file()
    assert "area_1              2" in out and "area_5a             1" in out
    assert "label values found: 0..13" in out and "checks passed." in out
    assert "fold 1: train 2 / test 1" in out and "allow_missing_areas=true" in out
    assert script.main(args) == 0 and "already prepared" in capsys.readouterr().out
    # a semantic_pretty-like image in place of an encoded one is caught
    semantic = sorted((dst / "area_1" / "data" / "semantic").glob("*.png"))[1]
    write_rgb_image(semantic, photo(3))
    with pytest.raises(DataError, match=semantic.name):
        script.main([*args, "--force"])


def test_prepare_dis5k_unzips_and_verifies(tmp_path, capsys):
    script = load_script("prepare/dis5k")
    staging, src, dst = tmp_path / "staging", tmp_path / "src", tmp_path / "data" / "DIS5K"
    write_dis5k(staging / "DIS5K", shape=(96, 128))
    src.mkdir()
    with zipfile.ZipFile(src / "DIS5K.zip", "w") as zf:
        for path in sorted((staging / "DIS5K").rglob("*")):
            zf.write(path, path.relative_to(staging).as_posix())
    with pytest.raises(DataError, match="drive.google.com"):  # nothing to work with
        script.main(["--src", str(tmp_path / "empty"), "--dst", str(tmp_path / "x")])
    args = ["--src", str(src), "--dst", str(dst)]
    assert script.main(args) == 0
    out = capsys.readouterr().out
    assert (dst / "DIS-TR" / "gt").is_dir() and not (dst / "DIS5K").exists()
    assert "train               3           3000" in out and "test3               2" in out
    assert "label values found: 0, 1" in out and "checks passed." in out
    assert script.main(args) == 0 and "already prepared" in capsys.readouterr().out
    gts = sorted((dst / "DIS-VD" / "gt").glob("*.png"))
    write_grey_image(gts[0], np.tile(np.linspace(0, 255, 128), (96, 1)))  # a soft matte, not 0/255
    empty = sorted((dst / "DIS-TE1" / "gt").glob("*.png"))[0]
    write_grey_image(empty, np.full((96, 128), 60))  # nothing reaches the threshold
    with pytest.raises(DataError) as info:
        script.main([*args, "--force"])
    message = str(info.value)
    assert gts[0].name in message and "neither 0 nor 255" in message
    assert empty.name in message and "no foreground" in message
