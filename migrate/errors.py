"""Errors raised by the migrate package (checkpoint, restore, migration).

All derive from :class:`MigrationError`, itself a :class:`runtime.errors.JaulaError`, so the
CLIs print them on one line.  CRIU failures carry the action, CRIU's errno and the lines of
its log that say why.
"""

from __future__ import annotations

from runtime.errors import JaulaError


class MigrationError(JaulaError):
    """Base of every checkpoint/restore/migration error."""


class CriuUnavailable(MigrationError):
    """CRIU is missing, too old, or ``criu check`` fails."""


class CriuFeatureMissing(MigrationError):
    """An option needs a kernel or CRIU feature this node lacks (e.g. soft-dirty)."""


class CriuError(MigrationError):
    """CRIU reported a failure.

    Attributes:
        action: ``dump``, ``restore``, ``pre-dump``, ``check``...
        errno: ``cr_errno`` from CRIU's reply (0 when unknown).
        log_path: CRIU's log file for this action.
        log_excerpt: the ``Error``/``Warn`` lines of that log, last ones first kept.
    """

    def __init__(
        self,
        action: str,
        message: str,
        errno: int = 0,
        log_path: str | None = None,
        log_excerpt: str = "",
    ) -> None:
        text = f"criu {action} failed: {message}"
        if log_excerpt:
            text += f" | criu log ({log_path}): {log_excerpt}"
        super().__init__(text)
        self.action = action
        self.errno = errno
        self.log_path = log_path
        self.log_excerpt = log_excerpt


class PreflightError(MigrationError):
    """A check before anything is frozen failed; nothing was touched."""


class BundleError(MigrationError):
    """A checkpoint bundle is malformed, incompatible or fails its digests."""


class ProtocolError(MigrationError):
    """A peer sent a message that does not follow the migration protocol."""


class TransferError(MigrationError):
    """Streaming a bundle between nodes failed."""


class PeerUnavailable(MigrationError):
    """A node did not answer in time, or refused our key."""


class KeyRefused(PeerUnavailable):
    """A node's ZAP handler refused our CURVE key (status 400): final until its cluster
    file lists the key, so waiting longer is pointless."""


class MigrationAborted(MigrationError):
    """A migration was rolled back; ``phase`` says where it stopped."""

    def __init__(self, message: str, phase: str) -> None:
        super().__init__(f"migration aborted during {phase}: {message}")
        self.phase = phase


class NodeConfigError(MigrationError):
    """A node, cluster or client configuration file, or a CURVE key file, is missing or wrong.

    The message names the file, the key in it that was wrong (when there is one) and what to
    write instead.

    Attributes:
        path: the file concerned (``None`` when no file was found at all).
        key: the dotted TOML key concerned (``nodes.node1.public_key``), or ``None``.
    """

    def __init__(self, message: str, path: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.key = key
