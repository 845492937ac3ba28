"""The demo's background traffic, run inside the lab's client namespace:
`python -m xdpwatch.demo.traffic DST DURATION SPIKE_AT SPIKE_PACKETS`."""

from __future__ import annotations

import random
import socket
import sys
import time


def traffic_main(dst: str, duration: float, spike_at: float, spike_packets: int) -> None:
    """Background UDP, TCP and ICMP from the client namespace to the server, plus one UDP
    burst at `spike_at`. Bounded: stops after `duration` s; the burst is `spike_packets`
    datagrams, at most 3 s. Only ever sends to `dst` (the lab's server namespace)."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    echo = bytes.fromhex("0800f7ff00000000")  # type 8, checksum for an all-zero id/seq
    start = time.monotonic()
    rng = random.Random(1)
    tick = spiked = 0
    while (now := time.monotonic() - start) < duration:
        for _ in range(rng.randint(3, 7)):
            udp.sendto(b"x" * rng.randint(20, 400), (dst, 5000 + rng.randint(0, 4)))
        if tick % 2 == 0:
            icmp.sendto(echo, (dst, 0))
        if tick % 5 == 0:
            with socket.socket() as tcp:  # to a closed port: SYN, RST back
                tcp.settimeout(0.3)
                try:
                    tcp.connect((dst, 80))
                except OSError:
                    pass
        if not spiked and now >= spike_at:
            spiked = 1
            end = time.monotonic() + 3
            for i in range(spike_packets):
                udp.sendto(b"spike", (dst, 5005))
                if i % 1000 == 0 and time.monotonic() > end:
                    break
        tick += 1
        time.sleep(0.1)


if __name__ == "__main__":
    traffic_main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
