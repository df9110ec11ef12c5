"""segexp.data.prepare, what every scripts/prepare/*.py shares: downloads that restart a partial
file, value lists in words, and a failure on the command line as one message."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from segexp.data import prepare
from tests.conftest import ROOT, load_script
from tests.data.conftest import file_url


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
