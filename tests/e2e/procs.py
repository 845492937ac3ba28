"""Run `xdpwatch` commands as a user would: subprocesses, stopped with a signal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

XDPWATCH = str(Path(sys.executable).with_name("xdpwatch"))


class XdpwatchProc:
    """`xdpwatch COMMAND ARGS…` in the background; stderr collected line by line."""

    def __init__(self, command: str, *args: str, env: dict | None = None):
        self.argv = [XDPWATCH, command, *args]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, **(env or {})})
        self.stderr_lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            self.stderr_lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.stderr_lines):
                return
            if self.proc.poll() is not None:
                self._reader.join(2)
                raise AssertionError(f"{self.argv[1]} exited {self.proc.returncode} before {text!r}:\n{self.stderr}")
            time.sleep(0.05)
        raise AssertionError(f"{self.argv[1]} did not log {text!r} within {timeout}s:\n{self.stderr}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            raise AssertionError(f"{self.argv[1]} ignored signal {sig} for {timeout}s:\n{self.stderr}")
        self._reader.join(5)
        return rc

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class ProducerProc(XdpwatchProc):
    """`xdpwatch produce`, spooling to a directory of its own (`spool_dir`, made fresh and
    removed afterwards unless given): no test sends another test's leftovers. Once it has
    stopped, `summary()` is its run's figures (--summary-file)."""

    def __init__(self, *args: str, env: dict | None = None, spool_dir: Path | None = None):
        self._own_spool = spool_dir is None
        self.spool_dir = Path(tempfile.mkdtemp(prefix="xw-spool-")) if spool_dir is None else spool_dir
        self._dir = Path(tempfile.mkdtemp(prefix="xw-producer-"))
        self.summary_file = self._dir / "summary.json"
        self._summary: dict | None = None
        super().__init__("produce", "--summary-file", str(self.summary_file), *args,
                         env={"XDPWATCH_SPOOL_DIR": str(self.spool_dir), **(env or {})})

    def summary(self) -> dict:
        """The --summary-file the producer wrote at exit (0600), also after the `with` block."""
        if self._summary is None:
            if not self.summary_file.exists():
                raise AssertionError(f"produce wrote no --summary-file:\n{self.stderr}")
            assert self.summary_file.stat().st_mode & 0o777 == 0o600
            self._summary = json.loads(self.summary_file.read_text())
        return self._summary

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self.summary_file.exists():
            self.summary()
        shutil.rmtree(self._dir, ignore_errors=True)
        if self._own_spool:
            shutil.rmtree(self.spool_dir, ignore_errors=True)

    def wait_attached(self) -> None:
        self.wait_for_log("attached XDP program")
