"""The producer's systemd unit, read as systemd reads it, and run as systemd would run it.

Where the tests run, systemd is not PID 1, so `systemd-run` cannot start the unit. `sandbox`
builds the same process instead from the unit's own directives: a private mount namespace
(`unshare`) with what each file-system directive does, then `setpriv` for the
user, the capability sets, no_new_privs and the umask, with the environment systemd gives a
service. A directive the unit gains that is neither emulated here nor listed as enforced by
seccomp or by the service manager makes `sandbox` fail: the test then has to decide about it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy/systemd/xdpwatch-producer.service"

# Directives `sandbox` reproduces in the process it starts.
EMULATED = {"User", "Group", "EnvironmentFile", "ExecStart", "AmbientCapabilities", "CapabilityBoundingSet",
            "NoNewPrivileges", "UMask", "ConfigurationDirectory", "ConfigurationDirectoryMode",
            "StateDirectory", "StateDirectoryMode", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateMounts",
            "PrivateDevices", "ProtectKernelTunables", "ProtectControlGroups", "ProtectKernelLogs", "ProtectProc"}
# Seccomp filters and namespaces of their own: not reproduced (the README says how they were
# checked: the system calls and socket families a producer run makes).
NOT_EMULATED = {"ProtectClock", "ProtectHostname", "RestrictAddressFamilies", "RestrictNamespaces",
                "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality", "SystemCallArchitectures"}
# What the service manager does around the process (restarts, stop timeout, IPC clean-up).
MANAGER = {"Type", "TimeoutStopSec", "Restart", "RestartSec", "RestartPreventExitStatus", "RemoveIPC"}

SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def parse(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections → key → every value given, in order (no line continuations: the unit has none)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert not line.endswith("\\"), f"continued line: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service() -> dict[str, str]:
    """[Service], the last value of each key (what systemd keeps for single-valued keys)."""
    return {k: v[-1] for k, v in parse(UNIT.read_text())["Service"].items()}


def env_file(text: str) -> dict[str, str]:
    """An EnvironmentFile= as systemd reads it, for the forms our example uses: comments,
    KEY=value, KEY='verbatim value'."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        else:
            assert "\\" not in value and '"' not in value, f"quote this value: {line}"
        env[key.strip()] = value
    return env


def expand(word: str, env: dict[str, str]) -> str:
    """${NAME} in ExecStart, as systemd expands it (one word stays one word)."""
    return re.sub(r"\$\{(\w+)\}", lambda m: env[m[1]], word)


def caps(value: str) -> str:
    """'CAP_BPF CAP_NET_ADMIN' → '+bpf,+net_admin' (setpriv's spelling)."""
    return ",".join("+" + c.removeprefix("CAP_").lower() for c in value.split())


def _mounts() -> list[tuple[str, str]]:
    """(mount point, file-system type) of this mount namespace."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape")
        fstype = fields[fields.index("-") + 1]
        out.append((point, fstype))
    return out


def sandbox(unit: dict[str, str], *, uid: int, gid: int, home: str, paths: dict[str, str],
            state_dir: Path, config_dir: Path) -> tuple[list[str], dict[str, str]]:
    """argv and environment that run the unit's ExecStart the way systemd would. `paths` maps
    the unit's absolute paths (prefixes) to where the test installed them; `state_dir` and
    `config_dir` stand for /var/lib/NAME and /etc/NAME (created by the caller, as systemd
    creates them)."""
    unknown = set(unit) - EMULATED - NOT_EMULATED - MANAGER
    assert not unknown, f"directives the sandbox knows nothing of: {sorted(unknown)}"
    assert unit["ProtectSystem"] == "strict" and unit["ProtectHome"] == "yes" and unit["ProtectProc"] == "invisible"
    for flag in ("NoNewPrivileges", "PrivateTmp", "PrivateMounts", "PrivateDevices", "ProtectKernelTunables",
                 "ProtectControlGroups", "ProtectKernelLogs"):
        assert unit[flag] == "yes", flag

    def mapped(path: str) -> str:
        for unit_path, real in paths.items():
            if path == unit_path or path.startswith(unit_path.rstrip("/") + "/"):
                return real + path[len(unit_path):]
        return path

    env = {"PATH": SERVICE_PATH, "LANG": "C.UTF-8", "HOME": home, "USER": unit["User"], "LOGNAME": unit["User"],
           "SHELL": "/usr/sbin/nologin", "STATE_DIRECTORY": str(state_dir), "CONFIGURATION_DIRECTORY": str(config_dir)}
    env.update(env_file(Path(mapped(unit["EnvironmentFile"])).read_text()))
    exec_start = [expand(w, env) for w in shlex.split(unit["ExecStart"])]
    exec_start[0] = mapped(exec_start[0])

    api = ("/proc", "/sys", "/dev")
    writable_fs = [p for p, fstype in _mounts() if fstype not in ("nsfs", "proc", "sysfs", "devtmpfs", "devpts")
                   and not any(p == a or p.startswith(a + "/") for a in api)]
    sys_mounts = [p for p, _ in _mounts() if p == "/sys" or p.startswith("/sys/")]
    q = shlex.quote
    script = ["set -e"]
    # ProtectSystem=strict: every file system read-only, the API file systems aside.
    script += [f"mount -o remount,bind,ro {q(p)}" for p in writable_fs]
    # StateDirectory= (the only writable place).
    script += [f"mount --bind {q(str(state_dir))} {q(str(state_dir))}",
               f"mount -o remount,bind,rw {q(str(state_dir))}"]
    # ProtectHome=yes: empty and inaccessible.
    script += [f"[ ! -d {d} ] || mount -t tmpfs -o ro,mode=000 tmpfs {d}" for d in ("/home", "/root", "/run/user")]
    # PrivateTmp=yes, then PrivateDevices=yes: a /dev with only the pseudo devices, built in
    # the private /tmp while the host's /dev is still in place, then moved over it.
    script += ["mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp",
               "mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp",
               "mkdir /tmp/.dev && mount -t tmpfs -o mode=755,nosuid,noexec tmpfs /tmp/.dev",
               "for d in null zero full random urandom tty; do touch /tmp/.dev/$d; mount --bind /dev/$d /tmp/.dev/$d; done",
               "mkdir /tmp/.dev/shm /tmp/.dev/pts && mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp/.dev/shm",
               "ln -s /proc/self/fd /tmp/.dev/fd && ln -s /proc/self/fd/0 /tmp/.dev/stdin",
               "ln -s /proc/self/fd/1 /tmp/.dev/stdout && ln -s /proc/self/fd/2 /tmp/.dev/stderr",
               "mount -n --move /tmp/.dev /dev && rmdir /tmp/.dev"]
    # ProtectProc=invisible: a /proc that shows only this user's processes.
    script += ["mount -t proc -o hidepid=invisible,nosuid,nodev,noexec proc /proc"]
    # ProtectKernelTunables=yes, ProtectControlGroups=yes: /proc/sys and all of /sys read-only.
    script += [f"[ ! -e /proc/{p} ] || {{ mount --bind /proc/{p} /proc/{p} && mount -o remount,bind,ro /proc/{p}; }}"
               for p in ("sys", "sysrq-trigger", "irq", "bus")]
    script += [f"mount -o remount,bind,ro {q(p)}" for p in sys_mounts]
    # ProtectKernelLogs=yes: /proc/kmsg inaccessible (/dev/kmsg is gone with PrivateDevices).
    script += ["touch /tmp/.inaccessible && chmod 000 /tmp/.inaccessible",
               "mount --bind /tmp/.inaccessible /proc/kmsg", "rm -f /tmp/.inaccessible"]
    script += [f"umask {unit['UMask']}", 'exec "$@"']
    cap_set = caps(unit["AmbientCapabilities"])
    assert caps(unit["CapabilityBoundingSet"]) == cap_set
    argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", "\n".join(script), "sandbox",
            "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", f"--inh-caps=-all,{cap_set}",
            f"--ambient-caps=-all,{cap_set}", f"--bounding-set=-all,{cap_set}", "--no-new-privs", "--",
            *exec_start]
    return argv, env
