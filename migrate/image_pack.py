"""The small CRIU images of a migration, packed into one file for the transfer.

A dump of a small container is a score of image files of a few KiB each (``core-*``,
``mm-*``, ``files.img``, ``mountpoints-*``...).  Sent one by one, each costs a file's round
of messages, about a millisecond here, all of it downtime; packed, they cost one.  The
pack is a plain POSIX (ustar) tar of regular files with bare names, made and read with
:mod:`tarfile`; reading refuses anything else (links, directories, devices, paths, names
not made of ``[A-Za-z0-9_.-]``) and never overwrites a file, so a pack cannot write
outside its directory.  Large images (memory pages sent as files, ghost files) travel on
their own: packing them would only add a copy.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path

from migrate.errors import BundleError

#: images up to this size go into the pack, bytes
PACK_MAX_FILE_BYTES = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")


def split(files: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """(files to pack, files to send on their own), each in the given order."""
    small: list[Path] = []
    large: list[Path] = []
    for p in files:
        (small if p.stat().st_size <= PACK_MAX_FILE_BYTES else large).append(p)
    return small, large


def pack(files: Iterable[Path], out: Path) -> int:
    """Write ``files`` (regular files, stored under their bare names) into the tar ``out``.
    Returns how many."""
    n = 0
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for p in files:
            info = tar.gettarinfo(str(p), arcname=p.name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o600
            with open(p, "rb") as f:
                tar.addfile(info, f)
            n += 1
    return n


def unpack(tar_path: Path, dest: Path, max_bytes: int) -> list[str]:
    """Write the files of the pack ``tar_path`` into the directory ``dest`` (mode 0600).

    Returns their names.  Raises BundleError naming the first entry that is not a regular
    file with a bare name, a file that already exists in ``dest``, or a total above
    ``max_bytes``."""
    names: list[str] = []
    total = 0
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for m in tar:
                if not m.isreg() or not _NAME.match(m.name) or m.name in (".", ".."):
                    raise BundleError(
                        f"the image pack holds {m.name!r}, which is not a "
                        "regular file with a plain name: refused"
                    )
                total += m.size
                if total > max_bytes:
                    raise BundleError(
                        f"the image pack unpacks to more than {max_bytes} bytes: refused"
                    )
                src = tar.extractfile(m)
                assert src is not None  # a regular file
                try:
                    fd = os.open(
                        dest / m.name,
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                        0o600,
                    )
                except FileExistsError:
                    raise BundleError(
                        f"the image pack holds {m.name!r} twice, or a name "
                        "that is already there: refused"
                    ) from None
                with os.fdopen(fd, "wb") as f:
                    while chunk := src.read(1 << 20):
                        f.write(chunk)
                names.append(m.name)
    except tarfile.TarError as e:
        raise BundleError(f"the image pack is not a readable tar: {e}") from e
    return names
