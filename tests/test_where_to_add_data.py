"""docs/ARCHITECTURE.md's "where to add" lists for a dataset and a metric are complete, proven as
test_where_to_add.py proves those of an assigner and an objective: the listed edits, and only those, applied to a
copy of the package that is imported in place of it.

A dummy dataset (`stripes`: grey stripes, a train and a test split) added by its two edits loads from a preset's
config, is fitted to the run's resolution, trains a tiny run whose FID point is scored against its test split, gives
`analyze` its held-out split and lets `sample --inpaint` fit an input image as its data. A dummy metric (`spread`:
the generated features' mean variance, raised to its setting `spread_power`) added by its two edits lands in every
FID row of a tiny run, is checked when `runs` reads the rows, and `compare` reads those rows beside an older run's
rows that lack it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, StubNetwork
from test_where_to_add import copy_package, edit, package_from

import immiscible_cli

READER = '''

def load_stripes(data: DataConfig, split: str) -> Images:
    """A dummy source for the where-to-add test: grey 20x12 stripes, 24 train and 12 test images, class = period - 2."""
    count = 24 if split == "train" else 12
    period = np.arange(count) % 3 + 2  # [N]
    rows = (np.arange(20)[None, :] // period[:, None]) % 2 * 255  # [N, 20]
    return np.repeat(rows[:, :, None], 12, axis=2).astype(np.uint8), (period - 2).astype(np.int64), 3

'''

SHORT = ["train.total_kimg=0.016", "eval.every_kimg=0.016", "eval.num_images=4", "eval.steps=2",
         "eval.batch_size=4"]


def stub_extractor():
    """The copy's FIDExtractor with the stub network of conftest.py (no Inception weights)."""
    from immiscible_cli.metrics import FIDExtractor, WeightsInfo

    return FIDExtractor("clean", "cpu", batch_size=4, network=StubNetwork(),
                        info=WeightsInfo("stub", "", "0" * 64, "float32"))


def train_tiny(root: Path, overrides: list[str]):
    """(config, Run) of a tiny run of the copy: 2 steps and an FID point of 4 images, scored by the stub network."""
    from immiscible_cli import config, trainer
    from immiscible_cli.metrics.scorer import FIDScorer

    cfg = config.load_config("quickstart", [*TINY, *SHORT, *overrides])
    return cfg, trainer.train(cfg, out_root=root / "runs", scorer=FIDScorer(cfg, torch.device("cpu"),
                                                                            extractor=stub_extractor()))


def check_the_dataset(root: Path) -> None:
    """The copy's dummy source at every seam that knows sources: loading and fitting, batches, training with an FID
    reference on its test split, analysis' held-out images and the in-painting input's fit."""
    from typing import get_args

    import immiscible_cli as copy
    from immiscible_cli import config, data, datasets, editing, runs
    from immiscible_cli.analysis.run_mode import held_out

    assert copy.__file__.startswith(str(root)), copy.__file__
    assert set(datasets.SOURCES) | {"latents"} == set(get_args(config.DataConfig.model_fields["source"].annotation))
    cfg, run = train_tiny(root, ["data.source=stripes", "data.fit=pad", "eval.reference_split=test"])
    images = data.load_images(cfg.data)  # [24, 1, 16, 16]: the width padded 12 -> 16, the height cropped 20 -> 16
    assert images.images.shape == (24, 1, 16, 16) and images.name == "stripes" and images.num_classes == 3
    assert images.images[..., :2].max() == 0 and images.images[..., 2:14].min() == 0
    assert images.images[..., 2:14].max() == 255 and images.labels.tolist()[:4] == [0, 1, 2, 0]
    batch, labels = data.BatchStream(images, 8, torch.device("cpu"), 0, True, False).next(torch.Generator())
    assert batch.shape == (8, 1, 16, 16) and float(batch.min()) == -1.0 and float(batch.max()) == 1.0
    rows = runs.read_fid_rows(run)  # one point, against the test split's 12 images
    assert [row["kimg"] for row in rows] == [0.016]
    assert {k: rows[0]["reference"][k] for k in ("name", "split", "num_images")} == {"name": "stripes",
                                                                                    "split": "test", "num_images": 12}
    held, note = held_out(cfg)
    assert note == "the test split" and len(held) == 12
    picture = torch.full((1, 1, 10, 30), 200, dtype=torch.uint8)  # sample --inpaint: fitted as the data, padded
    assert torch.equal(editing.fit_geometry(picture, cfg.data), data.fit_resolution(picture, 16, "pad"))


def test_a_new_dataset_is_two_edits(tmp_path: Path) -> None:
    package = copy_package(tmp_path)
    # 1. config/sections.py: the name among DataConfig.source's choices
    edit(package / "config" / "sections.py", '"imagefolder", "latents"]', '"imagefolder", "latents", "stripes"]')
    # 2. datasets.py: the reader and its Source in SOURCES
    sources = package / "datasets.py"
    edit(sources, "\n\nSOURCES: dict[str, Source] = {", READER + "\nSOURCES: dict[str, Source] = {")
    edit(sources, '.resolve().name}"),\n}', '.resolve().name}"),\n    "stripes": Source(load_stripes),\n}')
    with package_from(tmp_path):
        check_the_dataset(tmp_path)
    assert sys.modules["immiscible_cli"] is immiscible_cli


def check_the_metric(root: Path) -> None:
    """The copy's dummy metric in the rows of a tiny run, in `runs`' reading of them and in `compare`."""
    from typer.testing import CliRunner

    import immiscible_cli as copy
    from immiscible_cli import runs
    from immiscible_cli.cli import app
    from immiscible_cli.files import FileFormatError

    assert copy.__file__.startswith(str(root)), copy.__file__
    _, run = train_tiny(root, ["eval.reference_images=10"])
    rows = runs.read_fid_rows(run)
    assert [row["kimg"] for row in rows] == [0.016]
    assert all(row["spread"] > 0 and row["spread_power"] == 1.0 for row in rows)
    older = root / "runs" / "00099-older"  # a run of another learning rate, scored before the metric existed
    shutil.copytree(run.path, older)
    (older / runs.CONFIG).write_text((older / runs.CONFIG).read_text().replace("lr: 0.001", "lr: 0.002"))
    stripped = [{k: v for k, v in row.items() if k not in ("spread", "spread_power")} for row in rows]
    (older / runs.FID).write_text("".join(json.dumps(row) + "\n" for row in stripped))
    for where in ([], ["--where", "spread_power=1"]):  # one settings combination: SETTING_DEFAULTS fills the old
        result = CliRunner().invoke(app, ["compare", str(run.path), str(older), "--strict", "--json", *where])
        assert result.exit_code == 0, result.output
        compared = json.loads(result.stdout)["runs"]
        assert [row["best_fid"] for row in compared] == [min(row["fid"] for row in rows)] * 2
        assert [row["settings"]["spread_power"] for row in compared] == [1.0, 1.0]
    broken = root / "runs" / "00100-broken"
    shutil.copytree(run.path, broken)
    (broken / runs.FID).write_text(json.dumps({**rows[0], "spread": "wide"}) + "\n")
    with pytest.raises(FileFormatError, match="'spread' is \"wide\", expected a number"):
        runs.read_fid_rows(runs.Run(broken))


def test_a_new_metric_is_two_edits(tmp_path: Path) -> None:
    package = copy_package(tmp_path)
    # 1. metrics/scorer.py: its setting in FIDScorer.settings, its value in the row of FIDScorer.score
    scorer = package / "metrics" / "scorer.py"
    edit(scorer, '"inception_precision": self.extractor.precision,',
         '"inception_precision": self.extractor.precision, "spread_power": 1.0,')
    edit(scorer, '                row["kid"] = self._kid(stats)\n',
         '                row["kid"] = self._kid(stats)\n'
         '            row["spread"] = float(stats.mean_cov()[1].diagonal().mean()) ** row["spread_power"]\n')
    # 2. runs.py: the value's kind in FID_ROW, the setting in FID_SETTINGS with older rows' value
    rows = package / "runs.py"
    edit(rows, '"kid": NUMBER,', '"kid": NUMBER, "spread": NUMBER,')
    edit(rows, '"inception_precision")\n', '"inception_precision", "spread_power")\n')
    edit(rows, '"inception_precision": "fp32"}', '"inception_precision": "fp32", "spread_power": 1.0}')
    with package_from(tmp_path):
        check_the_metric(tmp_path)
    assert sys.modules["immiscible_cli"] is immiscible_cli

