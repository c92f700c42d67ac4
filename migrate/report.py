"""What a migration did: :class:`MigrationReport`, the ``migrated`` reply's ``report``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class MigrationReport:
    """What a migration did.  Times in seconds, sizes in bytes.

    Attributes:
        phases_s: seconds per phase (preflight, precopy, freeze, dump, transfer, restore,
            commit, resume, cleanup).
        downtime_s: from the freeze on the source to the tasks resumed on the destination.
        total_s: from the request to the source cleaned up.
        bytes_sent: payload bytes streamed to the destination (files and memory pages).
        page_server_bytes: of which memory pages sent by CRIU to the destination's page
            server (0 when the destination had none and the pages went as files); for
            ``postcopy``, the pages served after the resume.
        postcopy_s: ``postcopy`` only: seconds from the resume to the last page served
            (``phases_s["postcopy"]``), the time the container ran with memory still on
            the source.
        postcopy_error: ``postcopy`` only: why the transfer of the pages failed after the
            commit (the destination then killed the container), else empty.
        restore_steps_s: the destination's ``restore`` phase in seconds per step:
            ``pages`` (the page server's last writes), ``prepare`` (checks, upperdir delta,
            image record), ``lazy_daemon`` (post-copy), ``criu_restore`` (the monitor's
            CRIU restore up to ``pre-resume``).
        resume_confirmed: the destination confirmed the tasks run (else the destination
            resumes them on its own after asking for the outcome).
        owner_revision: the container's owner key revision after the commit's
            compare-and-swap (the destination's fencing token); 0 without a cluster state.
    """

    session: str
    container_id: str
    name: str
    source: str
    destination: str
    strategy: str
    phases_s: dict[str, float] = field(default_factory=dict)
    downtime_s: float = 0.0
    total_s: float = 0.0
    bytes_sent: int = 0
    page_server_bytes: int = 0
    files: int = 0
    resume_confirmed: bool = False
    postcopy_s: float = 0.0
    postcopy_error: str = ""
    restore_steps_s: dict[str, float] = field(default_factory=dict)
    owner_revision: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
