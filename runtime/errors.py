"""Errors raised by the runtime package.

Every error derives from :class:`JaulaError`; the CLI prints ``str(err)`` on one line and
exits non-zero.  Errors carry the container id or path they concern, so that the one line
says what was wrong and, where there is one, what to do.
"""

from __future__ import annotations


class JaulaError(Exception):
    """Base of every error jaula raises on purpose."""


class ContainerError(JaulaError):
    """A container operation failed.

    Attributes:
        container_id: the full id of the container concerned, or ``None`` when unknown.
    """

    def __init__(self, message: str, container_id: str | None = None) -> None:
        super().__init__(message)
        self.container_id = container_id


class InvalidContainerId(ContainerError):
    """A name or id that is not well formed (see :mod:`runtime.store`)."""


class ContainerExists(ContainerError):
    """A container with this name already exists under the state root."""


class ContainerNotFound(ContainerError):
    """No container matches the given name or id prefix."""


class AmbiguousContainer(ContainerError):
    """An id prefix matches more than one container."""


class InvalidStateTransition(ContainerError):
    """An operation is not allowed in the container's current status.

    Attributes:
        current: status the container is in.
        target: status the operation would have moved it to.
    """

    def __init__(self, container_id: str, current: str, target: str, action: str) -> None:
        super().__init__(
            f"container {container_id[:12]} is {current}: moving it to {target} ({action}) is "
            "not allowed",
            container_id,
        )
        self.current = current
        self.target = target


class ConfigError(JaulaError):
    """Bad user input in a container configuration (limits, mounts, user, env...)."""


class CommandNotFound(ConfigError):
    """The container's program does not exist in its image (exit code 127, as Podman)."""


class CommandNotExecutable(ConfigError):
    """The container's program exists but cannot be executed (exit code 126)."""


class CgroupError(JaulaError):
    """A cgroup operation failed.

    Attributes:
        path: the cgroupfs file or directory concerned.
        errno: the OS errno, when the failure came from the kernel.
    """

    def __init__(self, message: str, path: str | None = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


class MountError(JaulaError):
    """A mount, unmount or pivot_root failed."""


class NamespaceError(JaulaError):
    """Creating or entering a namespace failed."""


class ImageError(JaulaError):
    """An image could not be imported, found or removed."""


class ArchiveError(JaulaError):
    """A tar archive cannot be read safely (see :mod:`runtime.tarsafe`).

    Attributes:
        entry: the name of the member concerned as written in the archive, or ``None`` when
            no member is (an archive that is not a tar at all).
    """

    def __init__(self, message: str, entry: str | None = None) -> None:
        super().__init__(message)
        self.entry = entry


class CorruptArchiveError(ArchiveError):
    """A tar archive is malformed or truncated: not a tar, a bad header, a member whose data
    runs past the end, or no end-of-archive marker.

    Attributes:
        reason: what is wrong, without the archive's name (for callers that name it their way).
    """

    def __init__(self, message: str, reason: str, entry: str | None = None) -> None:
        super().__init__(message, entry)
        self.reason = reason


class UnsafeArchiveError(ImageError, ArchiveError):
    """A tar archive holds an entry that would escape its root or is not allowed.

    Attributes:
        entry: the name of the offending member as written in the archive.
    """

    def __init__(self, message: str, entry: str) -> None:
        super().__init__(message)
        self.entry = entry


class ArchiveLimitError(UnsafeArchiveError):
    """A tar archive is over one of its reader's bounds (entries, bytes of one entry, bytes in
    all); ``entry`` is the member at which the bound was passed.

    Attributes:
        limit: which bound: ``"entries"``, ``"entry_bytes"`` or ``"total_bytes"``.
        bound: its value (a count, or bytes).
    """

    def __init__(self, message: str, entry: str, limit: str, bound: int) -> None:
        super().__init__(message, entry)
        self.limit = limit
        self.bound = bound


class NotRootError(JaulaError):
    """The operation needs root (uid 0) and the caller is not root."""


class ImageNotFound(ImageError):
    """No image matches the given name, id or id prefix."""


class AmbiguousImage(ImageError):
    """An image id prefix matches more than one image."""


class ImageInUse(ImageError):
    """The image cannot be removed: a container uses it."""
