"""ARP on a link (RFC 826, RFC 5227): a probe for an address, and the gratuitous ARP a moved
container sends so that the segment learns where its MAC now is.

Frame (Ethernet II, EtherType 0x0806; 42 bytes)::

    dst mac(6) src mac(6) 0x0806 | htype=1 ptype=0x0800 hlen=6 plen=4 op(2)
                                 | sender mac(6) sender ip(4) target mac(6) target ip(4)

A probe has sender ip 0.0.0.0 (RFC 5227: it never pollutes caches); a gratuitous ARP is a
request with sender ip = target ip = the container's, to ff:ff:ff:ff:ff:ff.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TypeVar

ETH_P_ARP = 0x0806
_T = TypeVar("_T")


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def _mac_str(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def arp_frame(op: int, src_mac: str, sender_ip: str, target_ip: str) -> bytes:
    """One broadcast ARP frame (``op`` 1 request, 2 reply)."""
    mac = _mac_bytes(src_mac)
    eth = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac + socket.inet_aton(sender_ip)
    return eth + arp + b"\x00" * 6 + socket.inet_aton(target_ip)


def _link_mac(ifname: str) -> str:
    with open(f"/sys/class/net/{ifname}/address") as f:
        return f.read().strip()


def probe(ifname: str, ip: str, wait_s: float = 0.2, tries: int = 2) -> set[str]:
    """MACs that answer an ARP probe for ``ip`` sent on ``ifname`` (this net namespace)
    within ``wait_s`` seconds of each of ``tries`` probes.  OSError from the socket."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
        s.bind((ifname, ETH_P_ARP))
        frame = arp_frame(1, _link_mac(ifname), "0.0.0.0", ip)
        want = socket.inet_aton(ip)
        seen: set[str] = set()
        for _ in range(tries):
            s.send(frame)
            end = time.monotonic() + wait_s
            while (left := end - time.monotonic()) > 0:
                if not select.select([s], [], [], left)[0]:
                    break
                pkt = s.recv(128)
                is_reply = len(pkt) >= 42 and struct.unpack("!H", pkt[20:22])[0] == 2
                if is_reply and pkt[28:32] == want:
                    seen.add(_mac_str(pkt[22:28]))
        return seen


def in_netns(netns_path: str, fn: Callable[[], _T]) -> _T:
    """``fn()`` run in a thread that joined the net namespace ``netns_path`` (a net
    namespace belongs to a thread; the caller's stays as it was)."""
    from runtime import syscalls as sc

    out: list[_T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                sc.setns(fd, sc.CLONE_NEWNET)
            finally:
                os.close(fd)
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            err.append(e)

    t = threading.Thread(target=run, name="jaula-in-netns")
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


def announce(ifname: str, mac: str, ip: str, count: int = 3) -> None:
    """Send ``count`` gratuitous ARPs for ``ip`` at ``mac`` on ``ifname`` (this namespace):
    switches and neighbours then send to the port where the container is now."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
        s.bind((ifname, ETH_P_ARP))
        for i in range(count):  # requests and replies alternate: hosts heed one or the other
            s.send(arp_frame(1 if i % 2 == 0 else 2, mac, ip, ip))
