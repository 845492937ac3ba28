"""Files the consumers write are theirs alone: never written through a symbolic link someone
planted, created 0600 whatever the umask, and the archive refuses a directory others could
plant files in. Real files; the commands run as subprocesses where the error must be one line."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition

from xdpwatch.consumers.archive import LOCK_NAME, Archiver, list_segments
from xdpwatch.consumers.base import Event
from xdpwatch.consumers.errors import ConsumerError

XDPWATCH = str(Path(sys.executable).with_name("xdpwatch"))
TOPIC = "xdpwatch.ssh-flows"
NOBODY = 65534


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file an attacker would like the consumer (root) to overwrite."""
    v = tmp_path / "victim"
    v.write_bytes(b"precious\n")
    v.chmod(0o644)
    return v


def untouched(v: Path) -> bool:
    return v.read_bytes() == b"precious\n" and stat.S_IMODE(v.stat().st_mode) == 0o644


def event(offset: int) -> Event:
    value = b'{"n": %d}' % offset
    return Event(TOPIC, 0, offset, None, "ssh-flows", {"n": offset}, value)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# ------------------------------------------------------------------------------ archive
def test_a_link_planted_at_open_is_removed_at_assignment(tmp_path, victim):
    """A leftover `.open` (a crash's, or planted) is removed when its partition is assigned:
    unlink removes the link, not what it points to; the segment is then written as usual."""
    d = tmp_path / "a"
    d.mkdir(mode=0o700)
    link = d / f".{TOPIC}.p0.open"
    link.symlink_to(victim)
    arch = Archiver(d, 10**6, 3600)
    arch.assigned([TopicPartition(TOPIC, 0)], {})
    assert not link.is_symlink() and untouched(victim)
    for off in range(3):
        arch.handle(event(off))
    arch.close()
    assert untouched(victim)
    [seg] = list_segments(d)
    assert (seg.first, seg.last) == (0, 2) and mode(seg.path) == 0o600


def test_a_link_planted_while_running_is_refused(tmp_path, victim):
    """One that appears after the assignment is refused (O_EXCL | O_NOFOLLOW), with one clear
    error; neither the link nor its target is touched."""
    d = tmp_path / "a"
    arch = Archiver(d, 10**6, 3600)
    arch.assigned([TopicPartition(TOPIC, 0)], {})
    link = d / f".{TOPIC}.p0.open"
    link.symlink_to(victim)
    with pytest.raises(ConsumerError) as e:
        arch.handle(event(0))
    assert str(e.value) == (
        f"archive {d}: opening a segment failed: .{TOPIC}.p0.open is in the way: a symbolic link, or a file the "
        "archiver did not create (it never follows or overwrites one); remove it. Nothing past the last complete "
        "segment was committed; a restart resumes from the files.")
    assert link.is_symlink() and untouched(victim) and list_segments(d) == []


def test_a_link_at_the_lock_is_refused(tmp_path, victim):
    d = tmp_path / "a"
    d.mkdir(mode=0o700)
    (d / LOCK_NAME).symlink_to(victim)
    with pytest.raises(ConsumerError, match=rf"opening the archive directory failed: {LOCK_NAME} is in the way: "
                                            "a symbolic link"):
        Archiver(d, 10**6, 3600)
    assert untouched(victim)


def test_a_leftover_probe_is_replaced_not_followed(tmp_path, victim):
    """In a container the archiver's pid is the same every run: a crash's (or a planted)
    `.probe-<pid>` is removed before the test write."""
    d = tmp_path / "a"
    d.mkdir(mode=0o700)
    (d / f".probe-{os.getpid()}").symlink_to(victim)
    Archiver(d, 10**6, 3600)
    assert untouched(victim) and not (d / f".probe-{os.getpid()}").exists()


def test_files_are_0600_and_the_new_directory_0700_whatever_the_umask(tmp_path):
    d = tmp_path / "a"
    with umask(0):
        arch = Archiver(d, 10**6, 3600)
        arch.handle(event(0))
        assert mode(d / f".{TOPIC}.p0.open") == 0o600
        arch.close()
    assert mode(d) == 0o700 and mode(d / LOCK_NAME) == 0o600
    assert [mode(s.path) for s in list_segments(d)] == [0o600]


@pytest.mark.parametrize("dir_mode", [0o777, 0o770, 0o1777, 0o702])
def test_a_directory_others_can_write_is_refused(tmp_path, dir_mode):
    d = tmp_path / "a"
    d.mkdir()
    d.chmod(dir_mode)
    with pytest.raises(ConsumerError) as e:
        Archiver(d, 10**6, 3600)
    assert str(e.value) == (f"archive {d}: writable by group or others (mode {dir_mode:04o}); they could plant or "
                            "swap files: chmod go-w it (0700 is best), or choose another --dir")
    assert list(d.iterdir()) == []  # not even the lock was created


@pytest.mark.parametrize("dir_mode", [0o700, 0o750, 0o755])
def test_a_directory_only_its_owner_can_write_is_accepted(tmp_path, dir_mode):
    d = tmp_path / "a"
    d.mkdir()
    d.chmod(dir_mode)
    Archiver(d, 10**6, 3600)
    assert mode(d) == dir_mode  # an existing directory keeps its mode


def test_a_directory_of_another_user_is_refused(tmp_path):
    d = tmp_path / "a"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(ConsumerError) as e:
        Archiver(d, 10**6, 3600)
    assert str(e.value) == (f"archive {d}: owned by uid {NOBODY}, not by this user (uid {os.geteuid()}); its owner "
                            "could plant or swap files: chown it to this user, or choose another --dir")


def test_the_archive_command_refuses_an_open_directory_in_one_line(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    d.chmod(0o777)
    r = subprocess.run([XDPWATCH, "archive", "--dir", str(d), "--bootstrap-servers", closed_port()],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"xdpwatch: error: archive {d}: writable by group or others (mode 0777); they could plant or swap files: "
        "chmod go-w it (0700 is best), or choose another --dir"]


# ------------------------------------------------------------------------------ dead letters, alerts
def open_dead_letter(path: Path):
    from xdpwatch.consumers.base import FileDeadLetter

    return FileDeadLetter(str(path))


def open_alert_file(path: Path):
    from xdpwatch.consumers.alert import AlertSink

    return AlertSink(str(path), {}, "unused")


SINKS = {"dead-letter file": open_dead_letter, "alert output": open_alert_file}


@pytest.mark.parametrize("mask", [0, 0o022, 0o077])
@pytest.mark.parametrize("what", SINKS)
def test_new_output_files_are_0600_whatever_the_umask(tmp_path, what, mask):
    path = tmp_path / "out.jsonl"
    with umask(mask):
        sink = SINKS[what](path)
    sink.put({"n": 1})
    sink.close()
    assert mode(path) == 0o600 and path.read_bytes() == b'{"n":1}\n'
    sink = SINKS[what](path)  # an existing file is appended to
    sink.put({"n": 2})
    sink.close()
    assert path.read_bytes() == b'{"n":1}\n{"n":2}\n'


@pytest.mark.parametrize("what", SINKS)
def test_an_output_file_that_is_a_link_is_refused(tmp_path, victim, what):
    link = tmp_path / "out.jsonl"
    link.symlink_to(victim)
    with pytest.raises(ConsumerError) as e:
        SINKS[what](link)
    assert str(e.value) == f"cannot open {what} {link}: it is a symbolic link (never followed): give the real path"
    assert untouched(victim)


@pytest.mark.parametrize("option", ["--output", "--dead-letter"])
def test_the_alert_command_refuses_a_link_in_one_line(tmp_path, victim, option):
    link = tmp_path / "out.jsonl"
    link.symlink_to(victim)
    args = {"--output": ["--output", str(link), "--dead-letter", str(tmp_path / "dl.jsonl")],
            "--dead-letter": ["--output", "stdout", "--dead-letter", str(link)]}[option]
    r = subprocess.run([XDPWATCH, "alert", *args, "--bootstrap-servers", closed_port()],
                       capture_output=True, text=True, timeout=60)
    what = {"--output": "alert output", "--dead-letter": "dead-letter file"}[option]
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"xdpwatch: error: cannot open {what} {link}: it is a symbolic link (never followed): give the real path"]
    assert untouched(victim)


# ---------------------------------------------------------------- produce --summary-file
@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
def test_the_producer_summary_is_0600_whole_and_replaces_a_link(tmp_path, victim, mask):
    """finish() writes --summary-file 0600 whatever the umask, through a new file renamed
    over the old one: a link planted at its name is replaced, its target left alone."""
    from xdpwatch.producer.pipeline import RunSummary, finish

    summary = tmp_path / "summary.json"
    summary.symlink_to(victim)
    options = type("Options", (), {"summary_file": summary, "spool_dir": tmp_path / "spool"})()
    run = RunSummary(intervals=3, packets=10, flows_started=2)
    run.delivery.produced = run.delivery.delivered = 7
    with umask(mask):
        finish(run, options)
    assert not summary.is_symlink() and stat.S_IMODE(summary.stat().st_mode) == 0o600
    assert victim.read_bytes() == b"precious\n"
    import json

    assert json.loads(summary.read_text()) == {
        "packets": 10, "ssh_flows": 2, "flows_evicted": 0, "ringbuf_drops": 0, "intervals": 3,
        "events": {"produced": 7, "delivered": 7, "failed": 0, "undelivered": 0, "spooled": 0, "dropped": 0,
                   "already_in_kafka": 0}}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_the_producer_summary_is_written_when_events_were_lost(tmp_path):
    """Exit 3 (DeliveryError) after the summary says what was lost."""
    from xdpwatch.producer.errors import DeliveryError
    from xdpwatch.producer.pipeline import RunSummary, finish

    options = type("Options", (), {"summary_file": tmp_path / "s.json", "spool_dir": tmp_path / "spool"})()
    run = RunSummary()
    run.delivery.produced, run.delivery.delivered, run.delivery.failed = 5, 3, 2
    with pytest.raises(DeliveryError, match="2 of 5 events were not delivered"):
        finish(run, options)
    assert '"failed": 2' in (tmp_path / "s.json").read_text()


def test_a_summary_file_in_a_missing_directory_is_refused_before_anything_starts(tmp_path):
    r = subprocess.run([XDPWATCH, "produce", "--iface", "lo", "--output", "stdout",
                        "--summary-file", str(tmp_path / "nowhere" / "s.json")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"xdpwatch: error: --summary-file {tmp_path / 'nowhere' / 's.json'}: its directory does not exist")
