"""Non-finite and out-of-range values (issue 12, kind 2): every bad value is refused at validation, exit 2, in one
line naming the field path, whether it comes from `--set` or a preset file; a refused `train --resume` leaves the
run's config.yaml byte-identical; `--ckpt`, `--guidance` and `--seeds` refuse nan, inf and negatives."""

from __future__ import annotations

import shutil

import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY

from immiscible_cli import checkpoint, runs, study, trainer
from immiscible_cli.cli import app
from immiscible_cli.config import ConfigError, check_steps, load_config, preset_dir
from immiscible_cli.config.loading import apply_override, read_yaml

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def assert_one_line_error(result, *needles: str) -> str:
    """Exit 2, no traceback, exactly one output line (`error: ...`) holding every needle; returns the line."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# (preset, override, field path the message must name). quickstart is flow + vanilla, quickstart-knn flow + knn,
# cifar10-knn ddpm + knn.
BAD_VALUES = [
    ("quickstart", "train.total_kimg=.inf", "train.total_kimg"),
    ("quickstart", "train.total_kimg=1e400", "train.total_kimg"),
    ("quickstart", "train.total_kimg=.nan", "train.total_kimg"),
    ("quickstart", "train.total_kimg=-.inf", "train.total_kimg"),
    ("quickstart", "train.total_kimg=0", "train.total_kimg"),
    ("quickstart", "train.total_kimg=1e300", "train.total_kimg"),  # finite, but kimg x 1000 overflows
    ("quickstart", "train.lr=.inf", "train.lr"),
    ("quickstart", "train.lr=0", "train.lr"),
    ("quickstart", "train.lr=-1e-4", "train.lr"),
    ("quickstart", "train.betas=[0.9, 1.0]", "train.betas.1"),
    ("quickstart", "train.betas=[-0.1, 0.999]", "train.betas.0"),
    ("quickstart", "train.betas=[.nan, 0.999]", "train.betas.0"),
    ("quickstart", "train.weight_decay=.nan", "train.weight_decay"),
    ("quickstart", "train.warmup_kimg=-1", "train.warmup_kimg"),
    ("quickstart", "train.grad_clip=.inf", "train.grad_clip"),
    ("quickstart", "train.ema_decay=1.0", "train.ema_decay"),
    ("quickstart", "train.ema_decay=.nan", "train.ema_decay"),
    ("quickstart", "train.ema_halflife_kimg=.inf", "train.ema_halflife_kimg"),
    ("quickstart", "train.label_dropout=1e400", "train.label_dropout"),
    ("quickstart", "train.tick_kimg=0", "train.tick_kimg"),
    ("quickstart", "train.tick_kimg=0.0001", "train.tick_kimg"),  # rounds to zero images
    ("quickstart", "train.snapshot_kimg=1e400", "train.snapshot_kimg"),
    ("quickstart", "train.keep_every_kimg=0.0004", "train.keep_every_kimg"),
    ("quickstart", "train.batch_size=0", "train.batch_size"),
    ("quickstart", "train.batch_size=.inf", "train.batch_size"),
    ("quickstart", "train.keep_last=0", "train.keep_last"),
    ("quickstart", "model.channels=4", "model.channels"),
    ("quickstart", "model.channel_mult=[1, 0, 2]", "model.channel_mult.1"),
    ("quickstart", "model.channel_mult=[1, -2, 2]", "model.channel_mult.1"),
    ("quickstart", "model.attn_resolutions=[-8]", "model.attn_resolutions.0"),
    ("quickstart", "model.head_channels=24", "model.head_channels"),  # 32 and 64 channels: not a multiple
    ("quickstart", "model.dropout=1.0", "model.dropout"),
    ("quickstart", "model.dropout=.nan", "model.dropout"),
    ("quickstart", "data.resolution=30", "data.resolution"),  # two downsamplings need a multiple of 4
    ("quickstart", "seed=-1", "seed"),
    ("quickstart", "seed=4294967296", "seed"),
    ("quickstart", "objective.net_time_scale=.inf", "objective.net_time_scale"),
    ("quickstart", "objective.net_time_scale=0", "objective.net_time_scale"),
    ("quickstart", "assigner.image_scale=0", "assigner.image_scale"),
    ("quickstart", "assigner.image_scale=.nan", "assigner.image_scale"),
    ("quickstart-knn", "assigner.k=0", "assigner.k"),
    ("quickstart-knn", "assigner.memory_budget_mib=.inf", "assigner.memory_budget_mib"),
    ("quickstart", "sample.steps=0", "sample.steps"),
    ("quickstart", "sample.eta=1.5", "sample.eta"),
    ("quickstart", "sample.guidance=.nan", "sample.guidance"),
    ("quickstart", "sample.guidance=-1", "sample.guidance"),
    ("quickstart", "sample.ode_atol=0", "sample.ode_atol"),
    ("quickstart", "sample.ode_rtol=.inf", "sample.ode_rtol"),
    ("quickstart", "eval.num_images=1", "eval.num_images"),
    ("quickstart", "eval.every_kimg=.inf", "eval.every_kimg"),
    ("quickstart", "eval.every_kimg=0.0001", "eval.every_kimg"),
    ("quickstart", "eval.steps=0", "eval.steps"),
    ("quickstart", "eval.reference_images=1", "eval.reference_images"),
    ("cifar10-knn", "objective.beta_start=0", "objective.beta_start"),
    ("cifar10-knn", "objective.beta_end=1.0", "objective.beta_end"),
    ("cifar10-knn", "objective.beta_end=.nan", "objective.beta_end"),
    ("cifar10-knn", "objective.beta_start=0.05", "beta_end must be larger than beta_start"),  # not increasing
    ("cifar10-knn", "objective.timesteps=1", "objective.timesteps"),
    ("cifar10-knn", "sample.steps=1001", "sample.steps"),  # more steps than the schedule's timesteps
    ("cifar10-knn", "eval.steps=5000", "eval.steps"),
]


@pytest.mark.parametrize("preset, override, path", BAD_VALUES, ids=[o for _, o, _ in BAD_VALUES])
def test_bad_value_via_set_is_one_line_naming_the_field(preset, override, path):
    result = invoke("train", "--preset", preset, "--set", override, "--dry-run")
    assert_one_line_error(result, path, "--set ")


@pytest.mark.parametrize("preset, override, path", BAD_VALUES, ids=[o for _, o, _ in BAD_VALUES])
def test_bad_value_in_a_preset_file_is_one_line_naming_the_file_and_field(tmp_path, preset, override, path):
    raw = read_yaml(preset_dir() / f"{preset}.yaml")
    apply_override(raw, override)
    file = tmp_path / "mine.yaml"
    file.write_text(yaml.safe_dump(raw))  # .inf and .nan as YAML writes them; 1e400 as the string YAML reads
    result = invoke("train", "--preset", str(file), "--dry-run")
    assert_one_line_error(result, str(file), path)


def test_non_finite_message_says_what_to_do():
    line = assert_one_line_error(invoke("train", "--set", "train.total_kimg=1e400", "--dry-run"))
    assert "finite number" in line and "1e400" in line


def test_valid_edge_values_still_load():
    cfg = load_config("quickstart", ["train.betas=[0.0, 0.999]", "train.total_kimg=0.001", "train.tick_kimg=1e9",
                                     "eval.every_kimg=0", "train.keep_every_kimg=0.001", "seed=4294967295",
                                     "model.attn_resolutions=[]", "train.ema_decay=0.0", "sample.guidance=0"])
    assert cfg.train.betas == (0.0, 0.999) and cfg.train.total_kimg == 0.001 and cfg.seed == 2**32 - 1
    assert load_config("cifar10-knn", ["sample.steps=1000", "eval.steps=1000"]).sample.steps == 1000


def test_cli_steps_beyond_the_schedule_are_a_config_error():
    cfg = load_config("cifar10-knn")
    check_steps(cfg, 1000)
    with pytest.raises(ConfigError, match=r"--steps 1001: .*objective.timesteps 1000"):
        check_steps(cfg, 1001)
    check_steps(load_config("quickstart"), 10_000)  # flow matching has no timestep grid to run out of


def test_study_target_must_be_finite(tmp_path):
    file = tmp_path / "s.yaml"
    file.write_text("name: s\npreset: quickstart\nruns: {a: {}, b: {set: [assigner.name=knn]}}\nbaseline: a\n"
                    "target: .inf\n")
    with pytest.raises(ConfigError, match="target"):
        study.load_study(file)


# ------------------------------------------------------------------------------------------------------------------
# runs: resume, --ckpt, --guidance, --seeds


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> runs.Run:
    """A finished tiny run (snapshots at 0.016 and 0.032 kimg), shared: tests that write copy it first."""
    return trainer.train(load_config("quickstart", TINY), out_root=tmp_path_factory.mktemp("runs"))


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> runs.Run:
    shutil.copytree(tiny_run.path, tmp_path / tiny_run.name)
    return runs.open_run(tmp_path / tiny_run.name)


@pytest.mark.parametrize("override, path", [
    ("train.total_kimg=.inf", "train.total_kimg"),
    ("train.total_kimg=1e400", "train.total_kimg"),
    ("train.total_kimg=-1", "train.total_kimg"),
    ("train.snapshot_kimg=.nan", "train.snapshot_kimg"),
    ("eval.every_kimg=.inf", "eval.every_kimg"),
    ("sample.guidance=.nan", "sample.guidance"),
    ("sample.steps=0", "sample.steps"),
])
def test_refused_resume_leaves_config_yaml_byte_identical(run_copy, override, path):
    before = run_copy.config_path().read_bytes()
    result = invoke("train", "--resume", str(run_copy.path), "--set", override)
    assert_one_line_error(result, path, f"--set {override}")
    assert run_copy.config_path().read_bytes() == before
    assert [c.kimg for c in checkpoint.list_checkpoints(run_copy)] == [0.016, 0.032]


def test_resume_failing_in_the_trainer_leaves_config_yaml_byte_identical(run_copy):
    """A valid override whose resume fails later (no readable checkpoint) does not rewrite config.yaml."""
    before = run_copy.config_path().read_bytes()
    for ckpt in checkpoint.list_checkpoints(run_copy):
        ckpt.path.write_bytes(b"not a checkpoint")
    result = invoke("train", "--resume", str(run_copy.path), "--set", "train.total_kimg=0.048")
    assert result.exit_code == 2 and "checkpoint" in result.output, result.output
    assert run_copy.config_path().read_bytes() == before


def test_a_run_whose_config_yaml_holds_inf_is_a_clean_error(run_copy):
    """config.yaml of a run resumed by an older version with total_kimg=.inf: named, not a crash."""
    text = run_copy.config_path().read_text()
    run_copy.config_path().write_text(text.replace("total_kimg: 0.032", "total_kimg: .inf"))
    result = invoke("train", "--resume", str(run_copy.path))
    assert_one_line_error(result, str(run_copy.config_path()), "train.total_kimg", "finite")


@pytest.mark.parametrize("spec", ["nan", "inf", "-inf", "1e400", "-1", "-0.016", "soon"])
def test_sample_and_eval_refuse_a_non_finite_or_negative_ckpt(tiny_run, tmp_path, spec):
    grid = tmp_path / "g.png"
    result = invoke("sample", str(tiny_run.path), "--ckpt", spec, "--num", "2", "--grid", str(grid))
    assert_one_line_error(result, f"--ckpt {spec}", "latest")
    assert not grid.exists()  # nan used to pick the oldest snapshot silently
    assert_one_line_error(invoke("eval", str(tiny_run.path), "--fid", "--ckpt", spec), f"--ckpt {spec}")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1"])
def test_sample_refuses_a_non_finite_or_negative_guidance(tiny_run, tmp_path, value):
    grid = tmp_path / "g.png"
    result = invoke("sample", str(tiny_run.path), "--guidance", value, "--num", "2", "--grid", str(grid))
    assert_one_line_error(result, "--guidance")
    assert not grid.exists()


def test_sample_refuses_a_seed_torch_cannot_take(tiny_run, tmp_path):
    result = invoke("sample", str(tiny_run.path), "--seeds", str(2**64), "--grid", str(tmp_path / "g.png"))
    assert_one_line_error(result, "--seeds")


def test_sample_with_a_valid_kimg_still_works(tiny_run, tmp_path):
    grid = tmp_path / "g.png"
    result = invoke("sample", str(tiny_run.path), "--ckpt", "0.016", "--guidance", "1", "--num", "2",
                    "--grid", str(grid))
    assert result.exit_code == 0, result.output
    assert grid.stat().st_size > 0
