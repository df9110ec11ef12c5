"""segexp as an installed package: the segexp-* console commands declared in pyproject.toml, the
one error wrapper they share (``segexp: error: <message>``, exit status 1), and scripts, tests
and train.py that import segexp without editing the import path."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the [dev] extra installs tomli
    import tomli as tomllib

from segexp.cli import command, explained_error, run_command
from segexp.errors import ConfigError, DataError
from tests.conftest import ROOT

COMMANDS = {"segexp-train": "train", "segexp-eval": "evaluate", "segexp-predict": "predict",
            "segexp-export": "export_onnx", "segexp-compare": "compare_runs",
            "segexp-bench": "benchmark"}


def declared_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_command_is_declared_and_points_at_a_function():
    scripts = declared_scripts()
    assert set(scripts) == set(COMMANDS)
    for name, target in scripts.items():
        module_name, _, attr = target.partition(":")
        assert module_name == f"segexp.cli.{COMMANDS[name]}", name
        assert callable(getattr(importlib.import_module(module_name), attr)), target
    # `python scripts/X.py` stays: a thin wrapper over the same function.
    for module in COMMANDS.values():
        wrapper = ROOT / ("train.py" if module == "train" else f"scripts/{module}.py")
        assert f"from segexp.cli.{module} import cli" in wrapper.read_text(), wrapper


def test_the_package_declares_its_runtime_dependencies_once():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert {"torch", "torchvision", "timm", "hydra-core", "omegaconf", "opencv-python-headless",
            "numpy", "tqdm", "wandb"} <= names
    extras = project["optional-dependencies"]
    assert "pytest" in extras["dev"] and "segmentation-models-pytorch" in extras["bench"]
    assert {"onnx", "onnxruntime"} <= set(extras["onnx"])
    # The README's one set-up command installs segexp itself (editable) with those extras.
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("-e .[") and "dev" in line and "bench" in line and "onnx" in line
               for line in lines)


@pytest.mark.parametrize("raised, message", [
    (ConfigError("model.num_classes must be positive"), "model.num_classes must be positive"),
    # Hydra's instantiate and DataLoader workers re-raise ours wrapped in their own exceptions.
    (RuntimeError("wrapped"), "the mask holds 9"),
    (ConfigCompositionException("Could not find 'model/nosuch'"), "Could not find 'model/nosuch'"),
])
def test_an_explained_error_is_one_line_and_exit_status_1(capsys, raised, message):
    def main(argv):
        if message == "the mask holds 9":
            raise raised from DataError("the mask holds 9")
        raise raised

    assert run_command(main, []) == 1
    captured = capsys.readouterr()
    assert captured.err == f"segexp: error: {message}\n"
    assert captured.out == ""


def test_an_unexplained_error_keeps_its_traceback():
    def main(argv):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_command(main, [])
    assert explained_error(ValueError("x")) is None


def test_exit_status_of_results_and_interruptions(capsys):
    assert run_command(lambda argv: {"mIoU": 0.5}, []) == 0
    assert run_command(lambda argv: 3, []) == 3

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_command(interrupted, [], interrupted="run it again to resume") == 130
    assert capsys.readouterr().err == "segexp: interrupted: run it again to resume\n"
    with pytest.raises(KeyboardInterrupt):
        run_command(interrupted, [])
    with pytest.raises(SystemExit) as info:
        command(lambda argv: (_ for _ in ()).throw(DataError("no images")), [])
    assert info.value.code == 1 and capsys.readouterr().err == "segexp: error: no images\n"


@pytest.mark.parametrize("name", ["segexp-eval", "segexp-predict", "segexp-export", "segexp-compare"])
def test_each_command_entry_reports_a_missing_run_folder_in_one_line(name, tmp_path, monkeypatch, capsys):
    """The console entry functions themselves (what pip's segexp-* executables call)."""
    module_name, _, attr = declared_scripts()[name].partition(":")
    entry = getattr(importlib.import_module(module_name), attr)
    argv = [str(tmp_path / "nosuch")]
    if name == "segexp-predict":
        (tmp_path / "x.jpg").write_bytes(b"")  # an input that exists; the run folder does not
        argv.append(str(tmp_path / "x.jpg"))
    monkeypatch.setattr(sys, "argv", [name, *argv])
    with pytest.raises(SystemExit) as info:
        entry()
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("segexp: error: ") and err.count("\n") == 1, err
    assert "nosuch" in err


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "segexp-train"])
def test_each_command_has_help(name, monkeypatch, capsys):
    module = importlib.import_module(f"segexp.cli.{COMMANDS[name]}")
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_a_script_wrapper_runs_in_a_fresh_interpreter(tmp_path):
    """`python scripts/evaluate.py` imports segexp as a package (installed, or this checkout on
    PYTHONPATH as conftest sets it) and prints the wrapper's one line."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(tmp_path / "nosuch")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.startswith("segexp: error: ") and "Traceback" not in out.stderr


ENGINE_MODULES = ("torch", "torchvision", "timm", "segexp.engine.experiment")


@pytest.mark.parametrize("args, status", [(["--help"], 0), (["model=nosuch"], 1)],
                         ids=["help", "mistyped option"])
def test_train_answers_help_and_a_mistyped_option_without_loading_the_engine(args, status):
    """torch, torchvision and timm take seconds to import: Hydra's help and composition errors
    come before they load."""
    code = ("import sys\nfrom segexp.cli.train import cli\ntry:\n    cli()\nexcept SystemExit as e:\n"
            "    print('exit', e.code)\n"
            f"print('loaded', sorted(m for m in {ENGINE_MODULES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert f"exit {status}" in out.stdout, out.stderr[-2000:]
    assert "loaded []" in out.stdout, out.stdout[-2000:]
    if status:
        assert "nosuch" in out.stderr


def installed_command(name: str) -> Path | None:
    """The console command pip installed beside this interpreter, else in the repository's
    .venv (the README's set-up)."""
    for candidate in (Path(sys.executable).with_name(name), ROOT / ".venv" / "bin" / name):
        if candidate.is_file():
            return candidate
    return None


@pytest.mark.skipif(installed_command("segexp-eval") is None,
                    reason="segexp is not installed in this interpreter's environment (pip install -e .)")
def test_the_installed_command_runs_outside_the_repository(tmp_path):
    out = subprocess.run([str(installed_command("segexp-eval")), str(tmp_path / "nosuch")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.startswith("segexp: error: ") and "not a train.py run folder" in out.stderr


# -- no import-path edits ----------------------------------------------------------------------------
PATH_EDIT = re.compile(r"\bsys\.path\s*(\.\s*(insert|append|extend)\b|\+?=|\[)|noqa:\s*E402")


SKIPPED_DIRS = {".venv", ".git", "outputs", "data", "multirun", "wandb", "node_modules"}


def checked_files() -> list[Path]:
    """train.py, scripts/, tests/ and every notebook of the checkout."""
    notebooks = [Path(folder) / name
                 for folder, dirs, names in os.walk(ROOT)
                 if not dirs.__setitem__(slice(None), [d for d in dirs if d not in SKIPPED_DIRS])
                 for name in names if name.endswith(".ipynb")]
    return [ROOT / "train.py", *sorted((ROOT / "scripts").rglob("*.py")),
            *sorted((ROOT / "tests").rglob("*.py")), *notebooks]


def test_no_file_edits_the_import_path():
    offenders = [f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
                 for f in checked_files()
                 for n, line in enumerate(f.read_text().splitlines(), 1) if PATH_EDIT.search(line)]
    assert offenders == []


def test_the_path_edit_check_can_fail():
    path, noqa = "sys." + "path", "# noqa" + ": E402"  # split, or this file would match itself
    assert PATH_EDIT.search(f"{path}.insert(0, str(ROOT))")
    assert PATH_EDIT.search(f"{path}[:0] = [here]")
    assert PATH_EDIT.search(f"from segexp import config  {noqa}")
    assert not PATH_EDIT.search("spec = importlib.util.find_spec('segexp')")


def test_scripts_import_segexp_not_each_other():
    scripts = {p.stem for p in (ROOT / "scripts").rglob("*.py")} | {"scripts"}
    offenders = []
    for path in sorted((ROOT / "scripts").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in scripts]
    assert offenders == []
