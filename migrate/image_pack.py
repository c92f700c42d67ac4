"""The small CRIU images of a migration, packed into one file for the transfer.

A dump of a small container is a score of image files of a few KiB each (``core-*``,
``mm-*``, ``files.img``, ``mountpoints-*``...).  Sent one by one, each costs a file's round
of messages, about a millisecond here, all of it downtime; packed, they cost one.  The
pack is a plain POSIX (ustar) tar of regular files with bare names, made with
:mod:`tarfile` and read with the runtime's flat extractor (:func:`runtime.tarsafe.extract_flat`);
reading refuses anything else (links, directories, devices, paths, names not made of
``[A-Za-z0-9_.-]``, a truncated pack) and never overwrites a file, so a pack cannot write
outside its directory.  Large images (memory pages sent as files, ghost files) travel on
their own: packing them would only add a copy.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable
from pathlib import Path

from migrate.errors import BundleError
from runtime.errors import ArchiveError, UnsafeArchiveError
from runtime.tarsafe import TarLimits, extract_flat

#: images up to this size go into the pack, bytes
PACK_MAX_FILE_BYTES = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")
#: files a pack may hold (a dump has a few small images per task)
_MAX_ENTRIES = 100_000


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
    """Write the files of the pack ``tar_path`` into the directory ``dest`` (mode 0600), with
    :func:`runtime.tarsafe.extract_flat`.

    Returns their names.  Raises BundleError naming the first entry that is not a regular
    file with a bare name, a file that already exists in ``dest``, or a total above
    ``max_bytes``; or saying why the pack is not a valid, complete tar."""
    limits = TarLimits(
        max_entries=_MAX_ENTRIES, max_entry_bytes=max_bytes, max_total_bytes=max_bytes
    )
    try:
        return extract_flat(
            tar_path,
            dest,
            allowed=_plain_name,
            expected="a regular file with a plain name",
            limits=limits,
            what="the image pack",
        )
    except UnsafeArchiveError as e:  # a member not allowed, twice, or over the bound
        raise BundleError(f"{e}: refused") from e
    except ArchiveError as e:
        raise BundleError(f"the image pack is not a readable tar: {e}") from e
    except OSError as e:
        raise BundleError(f"cannot unpack the image pack into {dest}: {e.strerror or e}") from e


def _plain_name(parts: tuple[str, ...]) -> bool:
    return len(parts) == 1 and _NAME.match(parts[0]) is not None and parts[0] not in (".", "..")
