"""`xdpwatch demo --dir`: only a directory that is missing, empty or made by a demo is
emptied; anything else is refused in one line and left exactly as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from xdpwatch.demo import MARKER, DemoError, prepare_workdir

XDPWATCH = str(Path(sys.executable).with_name("xdpwatch"))


def tree(d: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(d)): None if p.is_dir() else p.read_bytes() for p in sorted(d.rglob("*"))}


def test_a_missing_directory_is_created_and_marked(tmp_path):
    d = tmp_path / "new" / "demo"
    prepare_workdir(d)
    assert tree(d) == {MARKER: (d / MARKER).read_bytes()}


def test_an_empty_directory_is_used_and_marked(tmp_path):
    d = tmp_path / "demo"
    d.mkdir()
    prepare_workdir(d)
    assert list(tree(d)) == [MARKER]


def test_a_directory_an_earlier_demo_made_is_emptied(tmp_path):
    d = tmp_path / "demo"
    prepare_workdir(d)
    outside = tmp_path / "keep"
    outside.mkdir()
    (outside / "file").write_text("kept")
    (d / "archive").mkdir()
    (d / "archive" / "seg.jsonl.zst").write_bytes(b"x")
    (d / "summary.json").write_text("{}")
    (d / "link").symlink_to(outside)  # removed as a link: what it points to stays
    prepare_workdir(d)
    assert list(tree(d)) == [MARKER]
    assert tree(outside) == {"file": b"kept"}


@pytest.mark.parametrize("marker", [None, "directory", "link"])
def test_any_other_directory_is_refused_and_left_alone(tmp_path, marker):
    d = tmp_path / "home"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    if marker == "directory":
        (d / MARKER).mkdir()
    elif marker == "link":
        (tmp_path / "elsewhere").write_text("")
        (d / MARKER).symlink_to(tmp_path / "elsewhere")
    before = tree(d)
    with pytest.raises(DemoError) as e:
        prepare_workdir(d)
    assert str(e.value) == (f"--dir {d} is not empty and no demo made it (no {MARKER} in it): nothing was removed; "
                            "choose another --dir, or empty it yourself")
    assert tree(d) == before


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_file_or_a_link_is_refused(tmp_path, kind):
    target = tmp_path / "target"
    if kind == "file":
        target.write_text("data")
        path = target
    else:
        target.mkdir()
        prepare_workdir(target)
        path = tmp_path / "link"
        path.symlink_to(target)
    with pytest.raises(DemoError, match=r"is not a directory \(or is a symbolic link\): choose another --dir"):
        prepare_workdir(path)
    assert target.exists() and (kind == "file" or (target / MARKER).exists())


def test_the_demo_command_refuses_in_one_line_before_starting_anything(tmp_path):
    """The directory is checked before anything starts: with no tools on PATH, a demo that
    got past it would stop at "sshpass is missing" instead."""
    d = tmp_path / "home"
    d.mkdir()
    (d / "notes").write_text("mine")
    assert os.geteuid() == 0, "the demo command checks for root first"
    r = subprocess.run([XDPWATCH, "demo", "--dir", str(d), "--duration", "10", "--no-live"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PATH": "/nonexistent"})
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"xdpwatch: error: --dir {d} is not empty and no demo made it (no {MARKER} in it): nothing was removed; "
        "choose another --dir, or empty it yourself"]
    assert tree(d) == {"notes": b"mine"}
