"""Send raw Ethernet frames out of one interface, exactly once each.

Run inside a namespace: `ip netns exec NS python tests/sendframes.py IFACE < frames`,
frames on stdin as (4-byte big-endian length, bytes)*. Prints the number sent.
Kept free of scapy so it starts fast.
"""

import socket
import struct
import sys


def main() -> None:
    iface = sys.argv[1]
    data = sys.stdin.buffer.read()
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    sent, off = 0, 0
    while off < len(data):
        (n,) = struct.unpack_from("!I", data, off)
        frame = data[off + 4: off + 4 + n]
        off += 4 + n
        if s.send(frame) != len(frame):
            raise SystemExit(f"short send of frame {sent}")
        sent += 1
    print(sent)


if __name__ == "__main__":
    main()
