"""Atomic writes: the target holds the old or the new content, never a half-written file."""

from __future__ import annotations

import pytest

from fedcare.shared.atomic import atomic_path, write_bytes_atomic, write_text_atomic


def test_writes_content_and_leaves_no_temp_file(tmp_path):
    write_text_atomic(tmp_path / "a.json", "{}\n")
    write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01", fsync=True)
    with atomic_path(tmp_path / "c.csv") as tmp:
        assert tmp.parent == tmp_path
        tmp.write_text("x,y\n")
    write_text_atomic(tmp_path / "a.json", "[]\n")  # replaces an existing file

    assert (tmp_path / "a.json").read_text() == "[]\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.csv").read_text() == "x,y\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "c.csv"]


def test_failure_inside_the_block_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(path) as tmp, tmp.open("w") as fh:
            fh.write("half a ro")
            raise RuntimeError("writer died")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_failing_writer_keeps_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old\n")

    with pytest.raises(UnicodeEncodeError):  # the temp file exists when the encoder fails
        write_text_atomic(path, "half é", encoding="ascii")
    with pytest.raises(TypeError):
        write_bytes_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
