"""Atomic writes and JSONL: what a crash can and cannot leave behind."""

from __future__ import annotations

import json

import pytest

from immiscible_cli import files


def test_truncated_last_jsonl_line_is_skipped_but_corruption_inside_is_an_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n" + '{"a": 2, "b"')
    assert files.read_jsonl(path) == [{"a": 1}]
    path.write_text('{"a": 1\n' + json.dumps({"a": 2}) + "\n")
    with pytest.raises(files.FileFormatError, match="line 1"):
        files.read_jsonl(path)


def test_write_atomic_replaces_whole_files(tmp_path):
    target = tmp_path / "f.bin"
    files.write_atomic(target, b"old")
    files.write_atomic(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary left behind
