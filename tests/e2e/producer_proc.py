"""Run `xdpwatch produce` as a user would: a subprocess, stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

XDPWATCH = str(Path(sys.executable).with_name("xdpwatch"))


class ProducerProc:
    def __init__(self, *args: str, env: dict | None = None):
        self.argv = [XDPWATCH, "produce", *args]
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
                raise AssertionError(f"producer exited {self.proc.returncode} before {text!r}:\n{self.stderr}")
            time.sleep(0.05)
        raise AssertionError(f"producer did not log {text!r} within {timeout}s:\n{self.stderr}")

    def wait_attached(self) -> None:
        self.wait_for_log("attached XDP program")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            raise AssertionError(f"producer ignored signal {sig} for {timeout}s:\n{self.stderr}")
        self._reader.join(5)
        return rc

    def __enter__(self) -> "ProducerProc":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
