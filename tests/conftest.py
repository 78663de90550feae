"""Shared test fixtures: every test runs offline, on the CPU, with caches inside tmp_path."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Keep user caches and the working directory out of the tests' way."""
    monkeypatch.setenv("IMMISCIBLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(2)
    yield


# A CPU-sized run: 16 px embedded images, a two-level UNet with 8 base channels, 8 images per step.
TINY = [
    "data.max_images=64", "data.resolution=16", "data.fit=resize",
    "model.channels=8", "model.channel_mult=[1, 2]", "model.num_res_blocks=1", "model.attn_resolutions=[8]",
    "model.head_channels=8", "model.dropout=0.1",
    "train.batch_size=8", "train.total_kimg=0.032", "train.tick_kimg=0.016", "train.snapshot_kimg=0.016",
    "train.warmup_kimg=0.016", "train.lr=1e-3", "train.ema_halflife_kimg=0.01", "train.keep_last=10",
    "sample.grid_size=4", "sample.steps=2", "eval.every_kimg=0",
    "train.channels_last=false",  # the quickstart presets' true would hide channels_last in every comparison
]


@pytest.fixture
def tiny():
    """--set overrides for a tiny CPU run (4 steps, a tick and a snapshot every 2 steps)."""
    return list(TINY)


class StubNetwork:
    """A deterministic stand-in for the Inception trunk: 16 pooled features of the resized, normalised input."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, 299, 299] -> [B, 16]
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # [B, 12]
        return torch.cat([pooled, pooled[:, :4].square()], dim=1)


@pytest.fixture
def stub_fid(monkeypatch):
    """Every FIDExtractor the library builds uses StubNetwork instead of the 90 MB Inception weights."""
    from immiscible_cli import evaluate
    from immiscible_cli.metrics import FIDExtractor, WeightsInfo, scorer

    def make(mode="clean", device="cpu", weights=None, batch_size=64, **_):
        return FIDExtractor(mode, device, batch_size=batch_size, network=StubNetwork(),
                            info=WeightsInfo("stub", "", "0" * 64, "float32"))

    monkeypatch.setattr(evaluate, "FIDExtractor", make)
    monkeypatch.setattr(scorer, "FIDExtractor", make)
    return make


def train_with_fid(cfg, **kwargs):
    """trainer.train with the FID scorer `immiscible train` hands it (None when the run has no FID point)."""
    from immiscible_cli import trainer
    from immiscible_cli.metrics.scorer import training_scorer

    return trainer.train(cfg, scorer=training_scorer(cfg, torch.device("cpu")), **kwargs)


def only_error(result) -> str:
    """The one line of a clean CLI failure (typer's CliRunner result): no traceback, nothing but `error: ...`."""
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]
