"""What the kernel's SSH observations mean: the identification strings (software versions)
and a guess at the login outcome from the sizes of the server's first packets."""

from __future__ import annotations

from xdpwatch.producer.records import SERVER_SIZES


def ssh_identification(raw: bytes) -> dict:
    """An SSH identification string (RFC 4253 4.2: SSH-protoversion-softwareversion SP
    comments CR LF) as fields. Hostile input is expected: bytes outside printable ASCII
    become '?', and a line cut by the copy limit is marked `truncated`."""
    line, end, _ = raw.partition(b"\n")
    text = "".join(chr(c) if 0x20 <= c < 0x7F else "?" for c in line.rstrip(b"\r"))
    out: dict = {"banner": text, "truncated": not end}
    if text.startswith("SSH-"):
        protocol, _, rest = text[4:].partition("-")
        software, _, comments = rest.partition(" ")
        out["protocol"] = protocol
        if software:
            out["software"] = software
        if comments:
            out["comments"] = comments
    return out


def login_outcome(sizes: list[int], ended: bool) -> dict:
    """Guess whether the client logged in, from the TCP payload sizes of the server's first
    segments (banner, KEXINIT, key exchange reply, then encrypted: SERVICE_ACCEPT, the
    reply to the client's first "none" request, which is a USERAUTH_FAILURE, ...).

    The heuristic Zeek uses: every later USERAUTH_FAILURE has the size of that first
    reply, while USERAUTH_SUCCESS is smaller (it carries no list of methods). So after it:
      a segment of the same size    one more failed attempt
      a smaller segment             success (confidence high)
      a larger one (PK_OK, prompts) keep looking
    A flow that ended after failures only is a failure (medium): the server closed on it.
    A server that went on talking for every segment we keep, with nothing smaller, most
    likely opened a session (success, low). Anything else is unknown. Calibrated on
    OpenSSH; servers that group their messages differently give unknown rather than a
    wrong answer, and one TCP segment carrying two messages can hide a success.
    """
    if len(sizes) < 5:
        return {"outcome": "unknown", "failures": 0}
    first_failure = sizes[4]
    failures = 0
    for size in sizes[5:]:
        if size == first_failure:
            failures += 1
        elif size < first_failure:
            return {"outcome": "success", "confidence": "high", "failures": failures}
    if failures and ended:
        return {"outcome": "failure", "confidence": "medium", "failures": failures}
    if len(sizes) == SERVER_SIZES and len(sizes) - 5 > failures:
        return {"outcome": "success", "confidence": "low", "failures": failures}
    return {"outcome": "unknown", "failures": failures}
