"""CLI option handling and errors: one clear line, non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from xdpwatch import schemas
from xdpwatch.producer.errors import ConfigError
from xdpwatch.producer.loader import BPF_DIR, SOURCE, BpfConfig, render_source

XDPWATCH = [sys.executable, "-m", "xdpwatch"]


def run(*args, env=None):
    return subprocess.run([*XDPWATCH, *args], capture_output=True, text=True, timeout=60, env=env)


def test_kafka_options_parse_like_kcat():
    import typer

    from xdpwatch.cli.options import kafka_options

    assert kafka_options(["security.protocol=SSL", "sasl.password=a=b"]) == {
        "security.protocol": "SSL", "sasl.password": "a=b"}
    with pytest.raises(typer.BadParameter, match="key=value"):
        kafka_options(["nonsense"])


@pytest.mark.parametrize("cfg,msg", [
    (BpfConfig(ssh_ports=()), "at least one"),
    (BpfConfig(ringbuf_pages=3), "power of two"),
    (BpfConfig(flow_table_size=1), "between"),
])
def test_bpf_config_validation(cfg, msg):
    with pytest.raises(ConfigError, match=msg):
        cfg.validate()


def test_dump_source_inlines_headers_and_shows_settings():
    src = render_source(BpfConfig(flow_table_size=1024, ringbuf_pages=8))
    assert "-DFLOW_TABLE_SIZE=1024" in src and "-DRINGBUF_PAGES=8" in src
    assert "struct flow_event {" in src and '#include "' not in src
    # Every file of bpf/ once (the loader compiles this text: a header left out would not build).
    starts = re.findall(r'^#line 1 "(.*)"$', src, re.M)
    assert sorted(starts) == sorted(str(p) for p in [*BPF_DIR.glob("*.h"), SOURCE])


def test_dump_source_line_markers_name_the_real_file_and_line():
    """What the compiler reports as file:line is that line of that file."""
    lines = render_source(BpfConfig()).splitlines()
    checked = 0
    for i, line in enumerate(lines):
        m = re.fullmatch(r'#line (\d+) "(.*)"', line)
        if m and i + 1 < len(lines) and not lines[i + 1].startswith("#line "):
            assert Path(m[2]).read_text().splitlines()[int(m[1]) - 1] == lines[i + 1], line
            checked += 1
    assert checked >= 2 * len(list(BPF_DIR.glob("*.h")))  # each header's start, and the line after it


def test_unknown_interface_is_one_line_and_exit_1():
    r = run("produce", "--iface", "does-not-exist0", "--bootstrap-servers", "127.0.0.1:1")
    assert r.returncode == 1
    assert r.stderr.strip() == ("xdpwatch: error: interface 'does-not-exist0' does not exist; "
                                "list interfaces with `ip link`")


def test_bad_flag_values_are_usage_errors():
    r = run("produce", "--iface", "lo", "--interval", "0")
    assert r.returncode == 2 and "Invalid value for '--interval'" in r.stderr and "Traceback" not in r.stderr
    r = run("produce", "--iface", "lo", "--xdp-mode", "turbo")
    assert r.returncode == 2 and "turbo" in r.stderr
    r = run("produce", "--iface", "lo", "--bootstrap-servers", "127.0.0.1:1", "-X", "oops")
    assert r.returncode == 2 and "Invalid value for '-X'" in r.stderr and "key=value" in r.stderr
    assert "Traceback" not in r.stderr


def test_block_on_refuses_rules_a_spoofer_can_trigger():
    """Refused before anything starts (no broker is reachable here), with the reason on one line."""
    no_address = "not one source: it has no address to block"
    for args, env, why in [
        (["--block-on", "ssh_bruteforce", "--block-on", "ssh_syn_flood"], {},
         "ssh_syn_flood counts SYNs, which anyone can send with a forged source address: it can alert but never block"),
        (["--block-on", "traffic_spike"], {}, f"traffic_spike measures an interface's packet rate, {no_address}"),
        ([], {"XDPWATCH_BLOCK_ON": "ssh_scan kernel_drops"},
         "kernel_drops reports events lost in the kernel, not a source: it has no address to block"),
        (["--block-on", "bruteforce"], {},
         "'bruteforce' is not an alert rule; rules that can block: ssh_bruteforce, ssh_auth_failures, ssh_scan"),
    ]:
        r = run("alert", "--bootstrap-servers", "127.0.0.1:1", *args, env={**os.environ, **env})
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1] == f"Error: Invalid value for '--block-on': {why}"
    r = run("alert", "--bootstrap-servers", "127.0.0.1:1", "--block-on", "ssh_scan", "--block-rate", "0")
    assert r.returncode == 2 and "Invalid value for '--block-rate'" in r.stderr


def test_missing_bootstrap_servers_is_explained():
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("XDPWATCH_")}
    r = run("produce", "--iface", "lo", env=env)
    assert r.returncode == 1 and "--bootstrap-servers" in r.stderr and "Traceback" not in r.stderr


def test_unreachable_broker_fails_fast_with_a_clear_line():
    # Nothing listens on port 1 of loopback.
    r = run("produce", "--iface", "lo", "--bootstrap-servers", "127.0.0.1:1", "-X", "socket.connection.setup.timeout.ms=1000")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("xdpwatch: error: cannot reach Kafka at 127.0.0.1:1") and "Traceback" not in r.stderr


def test_schemas_command_lists_and_prints():
    r = run("schemas")
    assert r.returncode == 0
    for name in schemas.names():
        assert name in r.stdout and schemas.schema_id(name) in r.stdout
    r = run("schemas", "ssh-flows")
    assert json.loads(r.stdout)["$id"] == schemas.schema_id("ssh-flows")
    r = run("schemas", "nope")
    assert r.returncode == 2 and "unknown stream" in r.stderr


@pytest.mark.parametrize("capeff,missing", [
    ("000001ffffffffff", []),                                   # root
    ("000000c000001000", []),                                   # CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN
    ("0000000000201000", []),                                   # CAP_SYS_ADMIN + CAP_NET_ADMIN
    ("0000008000000000", ["CAP_NET_ADMIN", "CAP_PERFMON"]),     # CAP_BPF only
    ("0000000000000000", ["CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"]),
])
def test_missing_capabilities(tmp_path, capeff, missing):
    from xdpwatch.producer.loader import missing_capabilities

    status = tmp_path / "status"
    status.write_text(f"Name:\tx\nCapEff:\t{capeff}\n")
    assert missing_capabilities(str(status)) == missing
