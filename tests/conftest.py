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
