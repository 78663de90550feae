"""Bad input from the environment and from user files (issue 25, items 3, 7, 8): garbage launcher variables, YAML
duplicate keys, nesting deep enough to exhaust the recursion limit. Each is one `error:` line naming the variable or
the file, exit 2, no traceback."""

from __future__ import annotations

import pytest
from conftest import TINY, only_error
from typer.testing import CliRunner

from immiscible_cli.cli import app

runner = CliRunner()
SETS = [a for s in TINY for a in ("--set", s)]



@pytest.mark.parametrize("env", [{"WORLD_SIZE": "two"}, {"WORLD_SIZE": "2", "RANK": "x", "LOCAL_RANK": "0"},
                                 {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "1.5"}, {"RANK": "-1"}])
@pytest.mark.parametrize("command", [["train", "--dry-run"], ["sample", "runs/none", "--num", "1", "--out", "x"]])
def test_garbage_launcher_variables_are_one_line_naming_the_variable(monkeypatch, tmp_path, env, command):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = runner.invoke(app, command)
    line = only_error(result)
    bad = next(name for name, value in env.items() if not value.isdigit())
    assert result.exit_code == 2 and f"{bad}={env[bad]}" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


# --- YAML duplicate keys (item 8) -------------------------------------------------------------------------------

STUDY_WITH_A_RUN_TWICE = """\
name: twice
base: quickstart
runs:
  vanilla: {}
  knn: {assigner: {name: knn}}
  vanilla: {train: {lr: 1.0e-3}}
"""


def test_a_key_given_twice_is_refused_in_presets_study_files_and_config_yaml(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    result = runner.invoke(app, ["train", "--preset", str(preset), "--dry-run"])
    line = only_error(result)
    assert result.exit_code == 2 and str(preset) in line and "'lr' twice" in line and "line 3" in line
    study = tmp_path / "s.yaml"
    study.write_text(STUDY_WITH_A_RUN_TWICE)
    result = runner.invoke(app, ["study", str(study), "--dry-run"])
    line = only_error(result)
    assert result.exit_code == 2 and "'vanilla' twice" in line
    from immiscible_cli.config import load_yaml
    assert load_yaml("a: 1\nb: {c: 2}\n") == {"a": 1, "b": {"c": 2}}
    assert load_yaml("base: &b {x: 1}\nother:\n  <<: *b\n  x: 2\n") == {"base": {"x": 1}, "other": {"x": 2}}


# --- deep nesting (item 3) ----------------------------------------------------------------------------------------

DEEP = 100_000


@pytest.mark.parametrize("where", ["preset", "set", "study", "config.yaml", "fid.jsonl", "compare --where"])
def test_nesting_past_the_recursion_limit_is_one_line_naming_the_file(tmp_path, where):
    deep = "[" * DEEP + "]" * DEEP
    run, other = tmp_path / "runs" / "00000-x", tmp_path / "runs" / "00001-y"
    for path in (run, other):  # compare needs two runs
        (path / "checkpoints").mkdir(parents=True)
        (path / "config.yaml").write_text(load_quickstart_yaml())
        (path / "fid.jsonl").write_text('{"kimg": 1, "fid": 2.0}\n')
    if where == "preset":
        (tmp_path / "p.yaml").write_text(f"train: {deep}\n")
        command, named = ["train", "--preset", str(tmp_path / "p.yaml"), "--dry-run"], "p.yaml"
    elif where == "set":
        command, named = ["train", "--dry-run", "--set", f"train.lr={deep}"], "train.lr"
    elif where == "study":
        (tmp_path / "s.yaml").write_text(f"name: s\nruns: {deep}\n")
        command, named = ["study", str(tmp_path / "s.yaml"), "--dry-run"], "s.yaml"
    elif where == "config.yaml":
        (run / "config.yaml").write_text(f"data: {deep}\n")
        command, named = ["compare", str(run), str(other)], "config.yaml"
    elif where == "fid.jsonl":
        (run / "fid.jsonl").write_text('{"kimg": 1, "fid": 2.0, "x": ' + deep + "}\n" + '{"kimg": 2, "fid": 1.0}\n')
        command, named = ["compare", str(run), str(other)], "fid.jsonl"
    else:
        command, named = ["compare", str(run), str(other), "--where", f"sampling.eta={deep}"], "--where"
    result = runner.invoke(app, command)
    line = only_error(result)
    assert result.exit_code == 2 and named in line


def load_quickstart_yaml() -> str:
    from immiscible_cli.config import load_config
    return load_config("quickstart", TINY).to_yaml()


# --- run files (item 10) ------------------------------------------------------------------------------------------


def test_an_empty_config_yaml_or_a_corrupt_meta_json_is_named_not_read_as_defaults(tmp_path):
    from immiscible_cli.runs import Run
    run, other = tmp_path / "00000-x", tmp_path / "00001-y"
    for path in (run, other):
        path.mkdir()
        (path / "config.yaml").write_text(load_quickstart_yaml())
        (path / "fid.jsonl").write_text('{"kimg": 1, "fid": 2.0}\n')
    (run / "config.yaml").write_text("")
    result = runner.invoke(app, ["compare", str(run), str(other)])
    line = only_error(result)
    assert result.exit_code == 2 and "config.yaml" in line and "empty" in line
    with pytest.raises(Exception, match="empty"):
        Run(run).config()
    (run / "meta.json").write_text("{not json")
    with pytest.raises(Exception, match="meta.json: not a JSON object"):
        Run(run).meta()


# --- absurd sizes (item 2) ----------------------------------------------------------------------------------------

HUGE = str(10**20)


@pytest.mark.parametrize("field", ["train.batch_size", "model.channels", "model.num_res_blocks", "eval.num_images",
                                   "sample.steps", "objective.timesteps", "train.batch_gpu", "assigner.k"])
def test_every_count_and_width_has_an_upper_bound_named_at_validation(field):
    sets = ["--set", "assigner.name=knn"] if field == "assigner.k" else []
    result = runner.invoke(app, ["train", "--dry-run", *sets, "--set", f"{field}={HUGE}"])
    line = only_error(result)
    assert result.exit_code == 2 and field.split(".")[1] in line


@pytest.mark.parametrize("command", [["sample", "RUN", "--num", HUGE, "--out", "x"],
                                     ["sample", "RUN", "--num", HUGE, "--inpaint", "--image", "a.png", "--out", "x"],
                                     ["eval", "RUN", "--fid", "--num-images", HUGE],
                                     ["eval", "RUN", "--fid", "--reference-images", HUGE],
                                     ["analyze", "RUN", "--samples", str(10**8)],
                                     ["analyze", "RUN", "--images", str(10**8)]])
def test_absurd_counts_on_the_command_line_are_refused_before_any_work(tmp_path, command):
    result = runner.invoke(app, [str(tmp_path / "run") if part == "RUN" else part for part in command])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    option = next(part for part in command if part.startswith("--") and part not in ("--out", "--fid", "--inpaint",
                                                                                     "--image"))
    assert option in result.output
    assert not (tmp_path / "x").exists()


def test_a_network_larger_than_memory_is_out_of_memory_naming_model_channels(monkeypatch):
    from immiscible_cli import networks
    from immiscible_cli.config import load_config
    from immiscible_cli.errors import OutOfMemory, is_out_of_memory

    cfg = load_config("quickstart", TINY)
    networks.build_network(cfg)  # fits
    monkeypatch.setattr(networks, "host_memory_bytes", lambda: 1000)
    with pytest.raises(OutOfMemory, match=r"lower model.channels \(now 8\)") as err:
        networks.build_network(cfg)
    assert err.value.exit_code == 4 and "\n" not in str(err.value)
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                                         "allocate memory: you tried to allocate 40000000000000 bytes. Error code 12"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
