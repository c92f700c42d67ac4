"""``/etc/hosts``, ``/etc/hostname`` and ``/etc/resolv.conf`` written into a container's
rootfs (its overlay upperdir, so they move with a migration as every other file does).

Contents (hosts(5), resolv.conf(5))::

    /etc/hosts        127.0.0.1 localhost / ::1 localhost ip6-localhost ip6-loopback /
                      <ip> <hostname> [<name>] / one "<ip> <name>" line per --add-host
    /etc/hostname     <hostname>
    /etc/resolv.conf  one "nameserver <ip>" per --dns, else the host's nameservers that are
                      not loopback (127.0.0.0/8, ::1: unreachable from the container)
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from runtime.network import NetworkError
from runtime.rootfs.mounts import secure_join


def parse_add_host(value: str) -> tuple[str, str]:
    """``NAME:IP`` (Podman's --add-host; IPv6 may be bracketed) -> (name, ip).  NetworkError
    otherwise."""
    name, sep, ip = value.partition(":")
    ip = ip.strip("[]")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        sep = ""
    if not sep or not name or any(c.isspace() for c in name):
        raise NetworkError(f"invalid --add-host {value!r}: use NAME:IP, e.g. db:10.89.0.7")
    return name, ip


def check_dns(value: str) -> str:
    """A --dns nameserver address; NetworkError unless it is an IP address."""
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError as e:
        raise NetworkError(f"invalid --dns {value!r}: use a nameserver's IP address") from e


def host_nameservers(resolv: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The host's nameservers that a container can reach (not loopback)."""
    out: list[str] = []
    try:
        lines = resolv.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        f = line.split()
        if len(f) >= 2 and f[0] == "nameserver":
            try:
                if not ipaddress.ip_address(f[1]).is_loopback:
                    out.append(f[1])
            except ValueError:
                continue
    return out


def _write(rootfs: Path, path: str, text: str) -> None:
    host = Path(secure_join(str(rootfs), path))
    host.parent.mkdir(parents=True, exist_ok=True)
    if host.is_symlink() or host.exists():
        host.unlink()
    tmp = host.with_name(f".{host.name}.jaula")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    tmp.rename(host)


def write_etc(
    rootfs: Path,
    hostname: str,
    name: str,
    ip: str,
    dns: tuple[str, ...],
    add_hosts: tuple[str, ...],
) -> None:
    """Write the three files of the module docstring under ``rootfs`` (a symlink in the
    image is replaced by a file).  OSError from the filesystem."""
    names = hostname if name in ("", hostname) else f"{hostname} {name}"
    hosts = [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{ip}\t{names}",
    ]
    hosts += [f"{h_ip}\t{h_name}" for h_name, h_ip in map(parse_add_host, add_hosts)]
    _write(rootfs, "/etc/hosts", "\n".join(hosts) + "\n")
    _write(rootfs, "/etc/hostname", hostname + "\n")
    servers = list(dns) or host_nameservers()
    _write(rootfs, "/etc/resolv.conf", "".join(f"nameserver {s}\n" for s in servers))
