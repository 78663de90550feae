"""Class-conditional runs: the -cond presets, true labels from every source, labels that stay with their images
through every assigner, label dropout, class-balanced guided FID images, and a conditional run through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import StubNetwork

from immiscible_cli import runs, train_state, trainer
from immiscible_cli.cli import app
from immiscible_cli.config import DataConfig, changed_fields, load_config
from immiscible_cli.data import BatchStream, DataError, ImageSet, check_classes, load_images
from immiscible_cli.metrics import FIDExtractor, WeightsInfo
from immiscible_cli.metrics.scorer import FIDScorer
from immiscible_cli.networks import build_network

runner = CliRunner()
CONDITIONAL = {"fmnist-knn-cond": "fmnist-knn", "fmnist-vanilla-cond": "fmnist-vanilla",
               "cifar10-knn-cond": "cifar10-knn"}


@pytest.mark.parametrize("name", sorted(CONDITIONAL))
def test_conditional_presets_are_their_unconditional_preset_with_labels(name):
    cond, base = load_config(name), load_config(CONDITIONAL[name])
    assert (cond.model.num_classes, cond.train.label_dropout, cond.sample.guidance) == (10, 0.1, 1.5)
    assert changed_fields(base, cond) == ["model.num_classes", "name", "sample.guidance"]


# ------------------------------------------------------------------------------------------------------------------
# labels from the data


def test_imagefolder_classes_are_its_sub_folders_and_conditional_runs_need_them(tmp_path):
    for folder, count in (("b-shirts", 2), ("a-shoes", 1)):
        (tmp_path / "tree" / folder).mkdir(parents=True)
        for i in range(count):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "tree" / folder / f"{i}.png")
    tree = load_images(DataConfig(source="imagefolder", root=str(tmp_path / "tree"), resolution=8))
    assert tree.num_classes == 2 and tree.labels.tolist() == [0, 1, 1]  # sorted sub-folder names
    check_classes(tree, 2)
    check_classes(tree, None)  # unconditional: labels unused
    with pytest.raises(DataError, match=r"model.num_classes: 1, but .* labels up to 1; set model.num_classes=2"):
        check_classes(tree, 1)
    Image.new("L", (8, 8)).save(tmp_path / "tree" / "stray.png")  # an image outside every class folder
    strays = load_images(DataConfig(source="imagefolder", root=str(tmp_path / "tree"), resolution=8))
    assert strays.labels.tolist() == [0, 1, 1, -1]
    with pytest.raises(DataError, match="1 images .* directly in data.root"):
        check_classes(strays, 2)
    (tmp_path / "flat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "flat" / "0.png")
    flat = load_images(DataConfig(source="imagefolder", root=str(tmp_path / "flat"), resolution=8))
    assert flat.num_classes == 0
    with pytest.raises(DataError, match="has none .* one sub-folder per class, or set model.num_classes=null"):
        check_classes(flat, 10)


def test_too_few_classes_for_the_data_is_one_line_and_writes_nothing(tmp_path, tiny):
    embedded = load_images(DataConfig(max_images=64))
    assert embedded.num_classes == 10 and sorted(set(embedded.labels.tolist())) == list(range(10))
    sets = sum((["--set", s] for s in tiny + ["model.num_classes=9"]), [])
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "runs"), *sets])
    assert result.exit_code == 2, result.output
    assert "model.num_classes: 9, but embedded has labels up to 9; set model.num_classes=10" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------------------------
# labels through a training step


def labelled_images(count: int = 20) -> ImageSet:
    """Image i is flat at grey level 20 * label + 10 (label i % 10): a label can be read back off its image."""
    labels = torch.arange(count) % 10
    images = (20 * labels + 10).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 16, 16).contiguous()
    return ImageSet(images, labels, 10, "labelled")


def one_step(tmp_path, tiny, overrides: list[str]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Train one step; the x0' and labels the objective's loss received, and the stream's own batch."""
    cfg = load_config("quickstart", tiny + ["model.num_classes=10", "train.batch_size=20", *overrides])
    data = labelled_images()
    loop = trainer.TrainingLoop(cfg, runs.Run(tmp_path), data, torch.device("cpu"))
    seen, loss = {}, loop.objective.loss

    def recording(net, x0, noise, t, labels):
        seen.update(x0=x0.clone(), labels=labels.clone())
        return loss(net, x0, noise, t, labels)

    loop.objective.loss = recording
    loop.train_step()
    loop.batches.discard()
    twin = BatchStream(data, 20, torch.device("cpu"), cfg.seed, cfg.data.hflip, resident=False)
    x0, labels = twin.next(torch.Generator().manual_seed(train_state.stream_seed(cfg.seed, "flips")))
    return seen, x0, labels


@pytest.mark.parametrize("assigner", [["assigner.name=linear"], ["assigner.name=knn", "assigner.k=4"]])
def test_assigners_pair_noise_and_never_move_images_or_labels(tmp_path, tiny, assigner):
    seen, x0, labels = one_step(tmp_path, tiny, assigner + ["train.label_dropout=0"])
    assert sorted(labels.tolist()) != labels.tolist()  # the data order is shuffled: a real check of the order
    assert torch.equal(seen["labels"], labels)  # the batch's labels, in the data order
    assert torch.equal(seen["x0"], x0)  # and the images: only the noise is chosen
    grey = ((seen["x0"][:, 0, 0, 0] + 1) * 127.5).round()  # [B]
    assert torch.equal(grey, 20 * seen["labels"].float() + 10)  # every image still has its own label


def test_label_dropout_replaces_exactly_the_drawn_images_with_the_null_label(tmp_path, tiny):
    seen, _, labels = one_step(tmp_path, tiny, ["assigner.name=knn", "assigner.k=4", "train.label_dropout=0.5"])
    drop = torch.rand(20, generator=torch.Generator().manual_seed(train_state.stream_seed(0, "labels"))) < 0.5
    assert 0 < int(drop.sum()) < 20
    assert torch.equal(seen["labels"], torch.where(drop, torch.full_like(labels, 10), labels))


# ------------------------------------------------------------------------------------------------------------------
# FID over all classes


class LabelRecorder(torch.nn.Module):
    """A conditional network that records the labels of every call."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.num_classes, self.calls = net, net.num_classes, []

    def forward(self, x, t, labels=None):
        self.calls.append(labels.clone())
        return self.net(x, t, labels)


def test_fid_images_are_class_balanced_and_the_row_records_the_guidance(tmp_path, tiny):
    cfg = load_config("quickstart", tiny + ["model.num_classes=10", "sample.guidance=2.0", "eval.steps=1",
                                            "eval.reference_images=10"])
    extractor = FIDExtractor("clean", "cpu", batch_size=8, network=StubNetwork(),
                             info=WeightsInfo("stub", "", "0" * 64, "float32"))
    scorer = FIDScorer(cfg, torch.device("cpu"), num_images=20, batch=8, extractor=extractor)
    torch.manual_seed(0)
    net = LabelRecorder(build_network(cfg).eval())
    row = scorer.score(net, kimg=0.0, step=0, train_s=0.0)
    assert row["guidance"] == 2.0 and row["num_images"] == 20
    assert [len(c) for c in net.calls] == [16, 16, 8]  # one guided call per batch: [cond; uncond]
    cond = torch.cat([c[:len(c) // 2] for c in net.calls])
    assert cond.tolist() == [i % 10 for i in range(20)]  # image i has class i % 10: every class twice
    assert all(set(c[len(c) // 2:].tolist()) == {10} for c in net.calls)  # the other half: the null label


# ------------------------------------------------------------------------------------------------------------------
# through the command line


def test_conditional_preset_trains_and_samples_a_class_through_the_cli(tmp_path, tiny):
    sets = sum((["--set", s] for s in tiny + ["data.source=embedded"]), [])
    result = runner.invoke(app, ["train", "--preset", "fmnist-vanilla-cond", "--out", str(tmp_path / "runs"), *sets])
    assert result.exit_code == 0, result.output
    run = runs.open_run(tmp_path / "runs" / "00000-fmnist-vanilla-cond")
    cfg = run.config()
    assert (cfg.model.num_classes, cfg.train.label_dropout, cfg.sample.guidance) == (10, 0.1, 1.5)
    assert [row["step"] for row in run.metrics()] == [2, 4]
    result = runner.invoke(app, ["sample", str(run.path), "--class", "3", "--guidance", "2", "--num", "4",
                                 "--grid", str(tmp_path / "three.png")])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "three.png") as grid:
        assert np.asarray(grid).std() > 0  # an image, not a blank
