"""The command line at its seam: help, presets, dry runs and clean errors (exit 2, no traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from immiscible_cli.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def assert_clean_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for needle in needles:
        assert needle in result.output, result.output


def test_help_lists_the_five_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("train", "sample", "eval", "compare", "presets"):
        assert command in result.output


@pytest.mark.parametrize("command", [["train"], ["sample"], ["eval"], ["compare"], ["presets"],
                                     ["presets", "show"], ["encode"]])
def test_every_command_has_examples(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Examples" in result.output
    assert "immiscible " + command[0] in result.output


def test_presets_list_and_show():
    listed = invoke("presets")
    assert listed.exit_code == 0
    for name in ("quickstart", "cifar10-knn", "cifar10-knn-fm", "fmnist-scale"):
        assert name in listed.output
    shown = invoke("presets", "show", "cifar10-knn")
    assert shown.exit_code == 0
    assert "k: 8" in shown.output and "lr: 0.0002" in shown.output  # resolved: defaults included
    assert_clean_error(invoke("presets", "show", "nope"), "unknown preset")


def test_dry_run_prints_and_writes_nothing(tmp_path):
    before = sorted(tmp_path.rglob("*"))
    result = invoke("train", "--preset", "cifar10-knn", "--dry-run", "--set", "train.lr=1e-4", "--out",
                    str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    assert "lr: 0.0001" in result.output and "00000-cifar10-knn" in result.output
    assert sorted(tmp_path.rglob("*")) == before


def test_train_without_preset_is_quickstart():
    result = invoke("train", "--dry-run")
    assert result.exit_code == 0 and "name: quickstart" in result.output


@pytest.mark.parametrize("yaml_text, needles", [
    ("train:\n  lrr: 1\n", ["train.lrr", "unknown field", "accepted here"]),
    ("train:\n  batch_size: lots\n", ["train.batch_size", "valid integer"]),
    ("assigner:\n  name: knn\n  k: -1\n", ["assigner.k", "greater than or equal to 1"]),
    ("data: [1\n", ["not valid YAML"]),
])
def test_bad_preset_files(tmp_path, yaml_text, needles):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml_text)
    assert_clean_error(invoke("train", "--preset", str(path), "--dry-run"), str(path), *needles)


def test_bad_set_and_missing_file(tmp_path):
    assert_clean_error(invoke("train", "--set", "train.nope=1", "--dry-run"), "--set train.nope=1", "train.nope")
    assert_clean_error(invoke("train", "--set", "train.lr", "--dry-run"), "section.field=value")
    assert_clean_error(invoke("train", "--preset", str(tmp_path / "gone.yaml"), "--dry-run"), "gone.yaml")


def test_resume_of_a_non_run_is_a_clean_error(tmp_path):
    assert_clean_error(invoke("train", "--resume", str(tmp_path)), "not a run directory")


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "immiscible_cli", "presets"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "quickstart" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "immiscible_cli", "train", "--set", "x.y=1", "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "x" in bad.stderr
