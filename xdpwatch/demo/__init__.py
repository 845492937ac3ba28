"""`xdpwatch demo`: the whole pipeline on this machine, with nothing else installed.

- lab: the real components on one machine (an in-memory broker, namespaces joined by a
  bridge, an OpenSSH server); the end-to-end tests build on it
- orchestration: the demo itself (`Demo`): starts them and `xdpwatch` commands, watches,
  stops, cleans up, sums up
- view: the topics read back as they fill, drawn live
- traffic: the background traffic, run in the lab's client namespace
"""

from xdpwatch.demo.orchestration import MARKER, Demo, DemoError, prepare_workdir, print_summary

__all__ = ["MARKER", "Demo", "DemoError", "prepare_workdir", "print_summary"]
