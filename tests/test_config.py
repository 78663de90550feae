"""Config validation, presets and `--set` overrides (library level; the CLI has its own tests)."""

from __future__ import annotations

import pytest
import yaml

from immiscible_cli import config as C


@pytest.mark.parametrize("name", sorted(C.list_presets()))
def test_every_shipped_preset_validates(name):
    cfg = C.load_config(name)
    assert cfg.name == name
    assert C.Config.model_validate(yaml.safe_load(cfg.to_yaml())) == cfg  # the resolved YAML reloads


@pytest.mark.parametrize("name", sorted(C.list_presets()))
def test_presets_hold_only_deltas_and_a_header(name):
    path = C.preset_dir() / f"{name}.yaml"
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert len(header) >= 3, "purpose, run time and hardware belong in the header"
    assert any("run time" in line.lower() for line in header) and any("hardware" in line.lower() for line in header)
    raw = yaml.safe_load(text)
    defaults = C.Config().to_dict()
    for section, fields in raw.items():
        if section in ("assigner", "objective"):  # the identity of a preset: stated in full on purpose
            continue
        for field, value in fields.items():
            assert value != defaults[section][field], f"{name}: {section}.{field} repeats the default {value!r}"


def test_issue_settings_of_named_presets():
    knn = C.load_config("cifar10-knn")
    assert (knn.assigner.name, knn.assigner.k, knn.objective.kind, knn.sample.sampler,
            knn.train.batch_size) == ("knn", 8, "ddpm", "ddim", 256)
    assert C.load_config("cifar10-scale").assigner.image_scale == 2.0
    for name in ("cifar10-knn-fm", "cifar10-vanilla-fm"):
        fm = C.load_config(name)
        assert fm.objective.kind == "flow" and fm.sample.sampler == "euler"
        assert (fm.train.lr, fm.train.grad_clip, fm.train.ema_decay, fm.train.batch_size) == (2e-4, 1.0, 0.9999, 256)
        assert fm.train.warmup_kimg == 5000 * 256 / 1000  # 5k steps of warm-up
        assert fm.eval.mode == "legacy_tensorflow" and fm.data.hflip
    assert C.load_config("cifar10-knn-fm").assigner.k == 4
    assert C.load_config("quickstart").data.source == "embedded"


def test_list_presets_has_descriptions():
    listed = C.list_presets()
    assert {"quickstart", "cifar10-knn", "fmnist-scale", "cifar10-knn-fm"} <= set(listed)
    assert all(description for description in listed.values())


def test_set_values_are_yaml():
    cfg = C.load_config("quickstart", ["model.channel_mult=[1, 2]", "train.lr=3e-4", "model.num_classes=10",
                                       "assigner.name=knn", "assigner.k=16", "data.hflip=false"])
    assert cfg.model.channel_mult == [1, 2] and cfg.train.lr == 3e-4 and cfg.model.num_classes == 10
    assert cfg.assigner.name == "knn" and cfg.assigner.k == 16 and cfg.data.hflip is False


@pytest.mark.parametrize("override, path", [
    ("train.lrr=1", "train.lrr"),
    ("train.lr=fast", "train.lr"),
    ("assigner.k=0", "assigner.k"),
    ("nosection.x=1", "nosection"),
    ("assigner.name=nearest", "assigner.name"),
    ("sample.sampler=ddim", "sample.sampler"),  # quickstart is flow matching: ddim does not belong
])
def test_bad_overrides_name_the_field(override, path):
    with pytest.raises(C.ConfigError) as e:
        C.load_config("quickstart", [override])
    assert path in str(e.value) and f"--set {override}" in str(e.value)


def test_bad_set_syntax():
    with pytest.raises(C.ConfigError, match="expected section.field=value"):
        C.load_config("quickstart", ["train.lr"])
    with pytest.raises(C.ConfigError, match="is a value, not a section"):
        C.load_config("quickstart", ["seed.x=1"])


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: many\n")
    with pytest.raises(C.ConfigError, match=r"bad\.yaml: train\.batch_size"):
        C.load_config(str(bad))
    with pytest.raises(C.ConfigError, match="no such preset file"):
        C.load_config(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load_config(str(broken))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(C.ConfigError, match="mapping"):
        C.load_config(str(scalar))


def test_resolution_must_suit_the_unet():
    with pytest.raises(C.ConfigError, match="data.resolution"):
        C.load_config("quickstart", ["data.resolution=30"])


def test_resumable_overrides_are_limited():
    cfg = C.load_config("quickstart")
    longer = C.with_overrides(cfg, ["train.total_kimg=12", "eval.num_images=100"], C.RESUMABLE_OVERRIDES)
    assert longer.train.total_kimg == 12 and longer.eval.num_images == 100
    with pytest.raises(C.ConfigError, match="cannot change in a run that has started"):
        C.with_overrides(cfg, ["train.lr=1"], C.RESUMABLE_OVERRIDES)


def test_digest_tracks_content():
    a, b = C.load_config("quickstart"), C.load_config("quickstart", ["seed=1"])
    assert a.digest() == C.load_config("quickstart").digest() != b.digest()


def test_reference_presets_carry_the_references_math():
    """cifar10-*: the papers' precision; DDPM ones tqch's EMA warm-up, strided DDIM grid and x0 clipping; flow ones
    torchcfm's time input; every header says how to get the papers' 50k-image FID."""
    names = [n for n in C.list_presets() if n.startswith("cifar10-")]
    assert len(names) == 7
    for name in names:
        cfg = C.load_config(name)
        assert cfg.train.precision == "fp32", name
        header = (C.preset_dir() / f"{name}.yaml").read_text()
        assert "--num-images 50000" in header, name
        if cfg.objective.kind == "ddpm":
            assert cfg.train.ema_warmup and cfg.sample.ddim_grid == "stride" and cfg.sample.clip_x0, name
        else:
            assert cfg.objective.net_time_scale == 1.0, name
    for name in ("fmnist-vanilla", "fmnist-knn", "fmnist-linear", "fmnist-scale", "fmnist-cpu"):
        cfg = C.load_config(name)
        assert cfg.train.ema_warmup and cfg.sample.ddim_grid == "stride", name
