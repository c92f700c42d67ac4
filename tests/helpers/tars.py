"""Hostile and unusual tars for the safe-reader tests, built in memory with :mod:`tarfile`.

* :func:`gnu_sparse_tar`: one old-GNU sparse member (type ``S``: the data runs in the header,
  the holes nowhere), as GNU tar ``--sparse --format=gnu`` writes it.
* :func:`pax_sparse_tar`: one PAX sparse member, GNU format 0.1 (``GNU.sparse.map`` and
  ``GNU.sparse.size`` records), as GNU tar ``--sparse --format=posix --sparse-version=0.1``.
* :func:`make_tar`: regular files, in order (a name may repeat).
* :func:`cuts`: the ways to truncate a tar after its first member that :mod:`tarfile` alone
  does not notice, and one it does.

Sources: GNU tar manual, "Storing Sparse Files" and "GNU tar and POSIX tar" (header layout:
the sparse map at offset 386, four (offset, numbytes) pairs of 12 bytes, the extension flag at
482, the real size at 483).
"""

from __future__ import annotations

import io
import tarfile

BLOCK = 512


def make_tar(files: dict[str, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar of regular files ``{name: data}``, in order, names written verbatim."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def gnu_sparse_tar(name: str, size: int, runs: list[tuple[int, bytes]]) -> bytes:
    """A tar holding one old-GNU sparse member ``name`` of apparent ``size`` bytes whose
    data is ``runs`` (offset, bytes), at most four of them; holes elsewhere."""
    assert len(runs) <= 4
    data = b"".join(d for _, d in runs)
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = len(data)  # what the archive stores
    info.mode = 0o644
    info.mtime = 1_700_000_000
    hdr = bytearray(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
    assert len(hdr) == BLOCK
    pos = 386
    for off, d in runs:
        hdr[pos : pos + 12] = tarfile.itn(off, 12, tarfile.GNU_FORMAT)  # type: ignore[attr-defined]
        hdr[pos + 12 : pos + 24] = tarfile.itn(len(d), 12, tarfile.GNU_FORMAT)  # type: ignore[attr-defined]
        pos += 24
    hdr[482] = 0  # no extension headers
    hdr[483:495] = tarfile.itn(size, 12, tarfile.GNU_FORMAT)  # type: ignore[attr-defined]
    hdr[148:156] = b" " * 8
    hdr[148:155] = b"%06o\0" % sum(hdr)
    return bytes(hdr) + _padded(data) + b"\0" * (2 * BLOCK)


def pax_sparse_tar(name: str, size: int, runs: list[tuple[int, bytes]]) -> bytes:
    """A PAX tar holding one GNU 0.1 sparse member ``name`` of apparent ``size`` bytes whose
    data is ``runs`` (offset, bytes); holes elsewhere."""
    data = b"".join(d for _, d in runs)
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.pax_headers = {
        "GNU.sparse.map": ",".join(f"{off},{len(d)}" for off, d in runs),
        "GNU.sparse.size": str(size),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def member_end(tar: bytes, index: int) -> int:
    """Offset just past the (padded) data of member ``index`` of ``tar``."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        m = tf.getmembers()[index]
    return m.offset_data + -(-m.size // BLOCK) * BLOCK


def cuts(tar: bytes) -> dict[str, bytes]:
    """``tar`` (two members or more, the last one a regular file of more than a block)
    truncated in each place that matters, by name."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        last = tf.getmembers()[-1]
    end = last.offset_data + -(-last.size // BLOCK) * BLOCK
    return {
        "no-end-marker-before-last": tar[: last.offset],  # the last member lost whole
        "inside-last-header": tar[: last.offset + 100],
        "no-end-marker-after-last": tar[:end],
        "inside-last-data": tar[: last.offset_data + BLOCK + 1],
    }
