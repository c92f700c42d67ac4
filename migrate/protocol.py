"""The jaula wire protocol: versioned msgpack messages with a schema check.

Every ZeroMQ message is one or two frames: frame 0 is a msgpack map ``{"v": 1, "type": T,
...fields}``; a ``chunk`` carries its data as raw bytes in frame 1 (no re-encoding of bulk
data).  :func:`decode` checks the version, the type and every field's type and size against
:data:`SCHEMAS` and raises :class:`ProtocolError` otherwise; the service answers such a
message with an ``error`` reply and carries on.  Never pickle.

Requests from an operator (or a balancer) to a node, each answered by one reply (``migrate``
first streams ``progress`` messages)::

    ping -> pong {node, containers, load, incarnation}
    ps {all} -> containers {items}
    inspect {container} -> inspected {info}      logs {container, tail} -> logs {data}
    exec {container, args, env} -> exec_result {exit_code, stdout, stderr}
    stop {container, timeout_s} -> ok            rm {container, force} -> ok
    migrate {container, destination, strategy} -> progress* -> migrated {report}
      (a ``progress {phase, heartbeat, incarnation}`` every HEARTBEAT_S while it runs: a
       client that hears nothing for a few of them asks ``ping``; another ``incarnation``
       there means the service restarted and the request is lost)
    metrics -> node_metrics {node, cpu/memory %, containers [...]}  (migrate.metrics)
    any -> error {code, message}

A migration session between the source node (DEALER) and the destination (ROUTER), after
DESIGN.md "The migration handoff"::

    source                                          destination
    offer {session, container, image, criu...,     preflight; starts `criu page-server`
           page_server ["tls"], ps_cert}      ──►    (TLS, the source's cert as its CA)
                                               ◄──  accept {missing_layers, data_endpoint,
                                                            data_key, page_server {address,
                                                            port, cert}} | error
    file_begin/chunk*/file_end (layers, rootfs)──►  digest checked per file
      (chunks go on the bulk data channel when one was offered: a plain socket, each chunk
       sealed with AES-256-GCM under data_key, see migrate.sealing)
                                               ◄──  credit {n} (flow control), file_ok
    [freeze + dump; the memory pages go to the page server as CRIU dumps them (TLS, each
     side pinned to the other's certificate); CRIU holds the tasks at post-dump]
    dumping {session} (every few s of a long dump)──►  the source is alive: no idle abort
    file_* (other CRIU images, small ones     ──►
            packed; rootfs delta)
    restore {stdio, volumes, deleted}         ──►  criu restore, held at pre-resume
                                               ◄──  restoring {session} every HEARTBEAT_S
                                                    (when accept's features name
                                                    "restoring_beats": the source, frozen,
                                                    gives up after its peer timeout of
                                                    silence, not the whole restore limit)
                                               ◄──  ready {restore_s}
    [commit point: source records migrated -> destination, its copy dies]
    resume {session}                          ──►  tasks resume
                                               ◄──  restoring* (as above), resumed {resume_s}
    abort {session, reason} (before commit)   ──►  held copy discarded ◄── aborted
    outcome {session} (destination recovering)──►  source's durable record decides

Which messages each side takes in which phase, and the phase each leads to, is a table
beside the schemas (:data:`SOURCE_TABLE`, :data:`DESTINATION_TABLE`); both sides check every
message against it (:func:`next_phase`), so a message out of order is a protocol error with
a reply, never an assert.  The source's phases follow a plan per strategy
(:data:`SOURCE_PLAN`), with the point of no return named: :attr:`SourcePhase.COMMIT`.

Source: the zguide, chapter 7 ("File transfer": credit-based flow control).
"""

from __future__ import annotations

import enum
from typing import Any, TypeVar

import msgpack

from migrate.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
CHUNK_BYTES = 4 << 20  #: fits the default 8 MiB frame limit (max_message_bytes)
#: seconds between a running ``migrate`` request's heartbeats (``progress`` with heartbeat),
#: and between a restoring destination's ``restoring`` messages
HEARTBEAT_S = 1.0
#: the ``accept`` feature of a destination that sends ``restoring`` while it restores
RESTORING_BEATS = "restoring_beats"

_STR = (str, 4096)
_NAME = (str, 256)
_BIG = (str, 1 << 20)
_INT = (int, None)
_NUM = ((int, float), None)
_BOOL = (bool, None)
_MAP = (dict, 10_000)
_LIST = (list, 100_000)

#: type -> {field: (python type(s), max length or None, required)}
SCHEMAS: dict[str, dict[str, tuple[Any, int | None, bool]]] = {
    # operator <-> node
    "ping": {},
    "pong": {
        "node": (*_NAME, True),
        "containers": (*_INT, True),
        "load": (*_MAP, False),
        "incarnation": (*_NAME, False),
    },
    "ps": {"all": (*_BOOL, False)},
    "containers": {"items": (*_LIST, True), "node": (*_NAME, False)},
    "inspect": {"container": (*_NAME, True)},
    "inspected": {"info": (*_MAP, True)},
    "logs": {"container": (*_NAME, True), "tail": (*_INT, False), "data": (bytes, 64 << 20, False)},
    "exec": {"container": (*_NAME, True), "args": (*_LIST, True), "env": (*_LIST, False)},
    "exec_result": {
        "exit_code": (*_INT, True),
        "stdout": (bytes, 64 << 20, True),
        "stderr": (bytes, 64 << 20, True),
    },
    "stop": {"container": (*_NAME, True), "timeout_s": (*_NUM, False)},
    "rm": {"container": (*_NAME, True), "force": (*_BOOL, False)},
    "ok": {"message": (*_STR, False)},
    "migrate": {
        "container": (*_NAME, True),
        "destination": (*_NAME, True),
        "strategy": (*_NAME, False),
    },
    "progress": {
        "phase": (*_NAME, True),
        "done_bytes": (*_INT, False),
        "total_bytes": (*_INT, False),
        "message": (*_STR, False),
        "heartbeat": (*_BOOL, False),
        "incarnation": (*_NAME, False),
    },
    "migrated": {"report": (*_MAP, True)},
    "metrics": {},
    "node_metrics": {  #: the fields and units: migrate.metrics
        "node": (*_NAME, True),
        "at_s": (*_NUM, True),
        "window_s": (*_NUM, True),
        "cpu_cores": (*_NUM, True),
        "memory_bytes": (*_INT, True),
        "cpu_percent": (*_NUM, True),
        "memory_percent": (*_NUM, True),
        "cpu_flags": (*_LIST, False),
        "image_layers": (*_LIST, False),
        "containers": (*_LIST, True),
    },
    "error": {"code": (*_NAME, True), "message": (*_BIG, True), "session": (*_NAME, False)},
    # node <-> node (migration session)
    "offer": {
        "session": (*_NAME, True),
        "container": (*_MAP, True),
        "image": (*_MAP, True),
        "criu_version": (*_LIST, True),
        "cpu_flags": (*_LIST, False),
        "estimate_bytes": (*_INT, False),
        "strategy": (*_NAME, False),
        "source_node": (*_NAME, False),
        "bulk": (*_LIST, False),
        "page_server": (*_LIST, False),
        "ps_cert": (bytes, 8192, False),
        "features": (*_LIST, False),
        "criu_patches": (*_LIST, False),
        "needs": (*_MAP, False),  #: migrate.portability.NodeNeeds
        "restart": (*_MAP, False),  #: runtime.restart.RestartPolicy (--restart)
    },
    "accept": {
        "session": (*_NAME, True),
        "missing_layers": (*_LIST, True),
        "data_endpoint": (*_STR, False),
        "data_key": (bytes, 64, False),
        "page_server": (dict, 16, False),
        "features": (*_LIST, False),  #: what this destination does, e.g. "restoring_beats"
    },
    "file_begin": {
        "session": (*_NAME, True),
        "file": (*_INT, True),
        "name": (*_STR, True),
        "kind": (*_NAME, True),
    },
    "chunk": {
        "session": (*_NAME, True),
        "file": (*_INT, True),
        "offset": (*_INT, True),
        "seq": (*_INT, False),
    },
    "file_end": {
        "session": (*_NAME, True),
        "file": (*_INT, True),
        "size": (*_INT, True),
        "sha256": (str, 64, True),
    },
    "credit": {"session": (*_NAME, True), "n": (*_INT, True)},
    "file_ok": {"session": (*_NAME, True), "file": (*_INT, True)},
    "restore": {
        "session": (*_NAME, True),
        "stdio": (*_MAP, True),
        "volumes": (*_LIST, True),
        "deleted": (*_LIST, True),
        "dump": (*_MAP, False),
        "netns": (*_NAME, False),
    },
    "ready": {"session": (*_NAME, True), "restore_s": (*_NUM, False), "steps_s": (dict, 16, False)},
    "resume": {"session": (*_NAME, True)},
    "dumping": {"session": (*_NAME, True)},
    "restoring": {"session": (*_NAME, True)},
    "resumed": {"session": (*_NAME, True), "resume_s": (*_NUM, False)},
    "abort": {"session": (*_NAME, True), "reason": (*_STR, True)},
    "aborted": {"session": (*_NAME, True)},
    "outcome": {"session": (*_NAME, True), "container": (*_NAME, False)},
    "outcome_is": {"session": (*_NAME, True), "committed": (*_BOOL, True)},
}


class MessageType(enum.StrEnum):
    """Every message type of the protocol (the ``type`` field)."""

    PING = "ping"
    PONG = "pong"
    PS = "ps"
    CONTAINERS = "containers"
    INSPECT = "inspect"
    INSPECTED = "inspected"
    LOGS = "logs"
    EXEC = "exec"
    EXEC_RESULT = "exec_result"
    STOP = "stop"
    RM = "rm"
    OK = "ok"
    MIGRATE = "migrate"
    PROGRESS = "progress"
    MIGRATED = "migrated"
    METRICS = "metrics"
    NODE_METRICS = "node_metrics"
    ERROR = "error"
    OFFER = "offer"
    ACCEPT = "accept"
    FILE_BEGIN = "file_begin"
    CHUNK = "chunk"
    FILE_END = "file_end"
    CREDIT = "credit"
    FILE_OK = "file_ok"
    RESTORE = "restore"
    READY = "ready"
    RESUME = "resume"
    DUMPING = "dumping"
    RESTORING = "restoring"
    RESUMED = "resumed"
    ABORT = "abort"
    ABORTED = "aborted"
    OUTCOME = "outcome"
    OUTCOME_IS = "outcome_is"


M = MessageType

#: what an operator (or the balancer) may ask a node; each is answered by one reply
OPERATOR_REQUESTS = frozenset(
    {M.PING, M.PS, M.INSPECT, M.LOGS, M.EXEC, M.STOP, M.RM, M.MIGRATE, M.METRICS}
)
#: what only a peer node may send: a session's offer, its messages, and outcome queries
NODE_MESSAGES = frozenset(
    {M.OFFER, M.OUTCOME, M.FILE_BEGIN, M.CHUNK, M.FILE_END, M.RESTORE, M.RESUME, M.ABORT, M.DUMPING}
)


class Strategy(enum.StrEnum):
    """How a migration moves memory (DESIGN.md "Words we use")."""

    COLD = "cold"  #: stop-and-copy: every page moves while the tasks are frozen
    POSTCOPY = "postcopy"  #: CRIU lazy pages: the tasks run first, pages follow on fault


class SourcePhase(enum.StrEnum):
    """The source's phases; the report's ``phases_s`` keys are their values."""

    PREFLIGHT = "preflight"
    PRECOPY = "precopy"
    FREEZE = "freeze"
    DUMP = "dump"
    TRANSFER = "transfer"
    RESTORE = "restore"
    COMMIT = "commit"  #: the point of no return: the record says migrated, our copy dies
    RESUME = "resume"
    POSTCOPY = "postcopy"
    CLEANUP = "cleanup"
    DONE = "done"
    ROLLED_BACK = "rolled_back"


class DestinationPhase(enum.StrEnum):
    """The destination's phases.  RESTORING and RESUMING are held while their handler
    runs (no message is read then); DONE and ABORTED end the session."""

    PREFLIGHT = "preflight"
    RECEIVING = "receiving"
    RESTORING = "restoring"
    HELD = "held"
    RESUMING = "resuming"
    DONE = "done"
    ABORTED = "aborted"


SP = SourcePhase
DP = DestinationPhase

#: strategy -> the source's phases in order; a failure before COMMIT rolls back
SOURCE_PLAN: dict[Strategy, tuple[SourcePhase, ...]] = {
    Strategy.COLD: (
        SP.PREFLIGHT,
        SP.PRECOPY,
        SP.FREEZE,
        SP.DUMP,
        SP.TRANSFER,
        SP.RESTORE,
        SP.COMMIT,
        SP.RESUME,
        SP.CLEANUP,
    ),
    Strategy.POSTCOPY: (
        SP.PREFLIGHT,
        SP.PRECOPY,
        SP.FREEZE,
        SP.DUMP,
        SP.TRANSFER,
        SP.RESTORE,
        SP.COMMIT,
        SP.RESUME,
        SP.POSTCOPY,
        SP.CLEANUP,
    ),
}

#: the source's phase -> message from the destination it takes -> the phase that message
#: leads to (None: the phase goes on; the source's own steps move it along its plan).
#: ``credit`` and ``file_ok`` may trail the files they answer by a phase or two.
_STREAM: dict[MessageType, SourcePhase | None] = {M.CREDIT: None, M.FILE_OK: None}
SOURCE_TABLE: dict[SourcePhase, dict[MessageType, SourcePhase | None]] = {
    SP.PREFLIGHT: {M.ACCEPT: SP.PRECOPY, M.ERROR: SP.ROLLED_BACK},
    SP.PRECOPY: {**_STREAM, M.ERROR: SP.ROLLED_BACK},
    SP.FREEZE: {**_STREAM, M.ERROR: SP.ROLLED_BACK},
    SP.DUMP: {**_STREAM, M.ERROR: SP.ROLLED_BACK},
    SP.TRANSFER: {**_STREAM, M.ERROR: SP.ROLLED_BACK},
    SP.RESTORE: {M.CREDIT: None, M.RESTORING: None, M.READY: SP.COMMIT, M.ERROR: SP.ROLLED_BACK},
    SP.COMMIT: {M.ERROR: None},
    SP.RESUME: {M.RESTORING: None, M.RESUMED: SP.CLEANUP, M.ERROR: None},  # after commit: logged
    SP.POSTCOPY: {M.ERROR: None},
    SP.CLEANUP: {M.ERROR: None},
    SP.DONE: {},
    SP.ROLLED_BACK: {M.ABORTED: None, M.ERROR: None, M.RESTORING: None, **_STREAM},
}

#: the destination's phase -> message from the source it takes -> the phase after its
#: handler (DESIGN.md "The migration handoff", steps 4-7)
DESTINATION_TABLE: dict[DestinationPhase, dict[MessageType, DestinationPhase]] = {
    DP.PREFLIGHT: {},
    DP.RECEIVING: {
        M.FILE_BEGIN: DP.RECEIVING,
        M.CHUNK: DP.RECEIVING,
        M.FILE_END: DP.RECEIVING,
        M.DUMPING: DP.RECEIVING,
        M.RESTORE: DP.HELD,
        M.ABORT: DP.ABORTED,
    },
    DP.RESTORING: {},
    DP.HELD: {M.RESUME: DP.DONE, M.ABORT: DP.ABORTED},
    DP.RESUMING: {},
    DP.DONE: {},
    DP.ABORTED: {},
}

_P = TypeVar("_P", SourcePhase, DestinationPhase)


def next_phase(table: dict[_P, dict[MessageType, Any]], phase: _P, mtype: str, side: str) -> Any:
    """The phase that ``mtype`` leads to from ``phase`` in ``table`` (None: unchanged).

    Raises ProtocolError naming the message, the phase and what that phase takes, when the
    table does not list ``mtype`` for ``phase``."""
    allowed = table[phase]
    try:
        key = MessageType(mtype)
    except ValueError:
        key = None
    if key is None or key not in allowed:
        takes = ", ".join(sorted(allowed)) or "nothing"
        raise ProtocolError(
            f"{mtype} is out of order: the {side} is in phase {phase.value}, which takes {takes}"
        )
    return allowed[key]


def encode(mtype: str, payload: bytes | None = None, **fields: Any) -> list[bytes]:
    """Frames for one message.  Raises ProtocolError for an unknown type or a field that
    breaks the schema (we check what we send too)."""
    msg = {"v": PROTOCOL_VERSION, "type": mtype, **fields}
    _check(msg)
    frames = [msgpack.packb(msg, use_bin_type=True)]
    if payload is not None:
        frames.append(payload)
    return frames


def decode(frames: list[bytes]) -> tuple[dict[str, Any], bytes | None]:
    """Parse and check one message.  Returns (fields, payload frame or None).

    Raises ProtocolError naming what is wrong (malformed msgpack, version, type, field)."""
    if not frames or len(frames) > 2:
        raise ProtocolError(f"a message has 1 or 2 frames, got {len(frames)}")
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise ProtocolError(
            f"message header of {len(frames[0])} bytes is over the {MAX_HEADER_BYTES}-byte limit"
        )
    try:
        msg = msgpack.unpackb(frames[0], raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 - msgpack raises several types
        raise ProtocolError(f"not a msgpack message: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a msgpack map")
    _check(msg)
    payload = frames[1] if len(frames) == 2 else None
    if payload is not None and msg["type"] != "chunk":
        raise ProtocolError(f"a {msg['type']} message carries no payload frame")
    if msg["type"] == "chunk" and payload is None:
        raise ProtocolError("a chunk message needs its data frame")
    return msg, payload


#: requests that change something: each carries a unique string ``id`` (REQUEST_ID_LEN
#: characters at least, e.g. random hex), and the node refuses the same id from the same
#: peer again within its replay window (a captured request resent does not run twice)
STATE_CHANGING = frozenset({"exec", "stop", "rm", "migrate"})
REQUEST_ID_LEN = (16, 128)
MAX_ARG_BYTES = 128 << 10  #: one exec argument or environment entry (Linux's MAX_ARG_STRLEN)
MAX_LOG_TAIL = 10_000_000  #: records
MAX_STOP_TIMEOUT_S = 3600.0


def _exec_strings(items: list[Any], need_eq: bool, min_items: int) -> str | None:
    if len(items) < min_items:
        return f"needs at least {min_items} item(s)"
    for i, item in enumerate(items):
        if not isinstance(item, str):
            return f"item {i} is {type(item).__name__}, not a string"
        if "\0" in item:
            return f"item {i} contains a NUL byte"
        if len(item.encode()) > MAX_ARG_BYTES:
            return f"item {i} is over {MAX_ARG_BYTES} bytes"
        if need_eq and (not item or item.startswith("=") or "=" not in item):
            return f"item {i} {item[:40]!r} is not NAME=VALUE"
    return None


def _in_range(value: float, low: float, high: float) -> str | None:
    if not low <= value <= high:  # also refuses NaN
        return f"{value!r} is out of range: give {low:g} to {high:g}"
    return None


#: (type, field) -> check of its value beyond type and size: the problem, or None
_VALUE_CHECKS: dict[tuple[str, str], Any] = {
    ("exec", "args"): lambda v: _exec_strings(v, False, 1),
    ("exec", "env"): lambda v: _exec_strings(v, True, 0),
    ("logs", "tail"): lambda v: _in_range(v, 1, MAX_LOG_TAIL),
    ("stop", "timeout_s"): lambda v: _in_range(v, 0, MAX_STOP_TIMEOUT_S),
}


def request_id(frames: list[bytes]) -> int | str | None:
    """The ``id`` of a message that may not pass :func:`decode` (for its error reply, so
    that the client sees the answer to its request), or None."""
    try:
        msg = msgpack.unpackb(frames[0], raw=False) if frames else None
    except Exception:  # noqa: BLE001 - junk: no id
        return None
    rid = msg.get("id") if isinstance(msg, dict) else None
    return rid if isinstance(rid, (int, str)) and not isinstance(rid, bool) else None


def _check(msg: dict[str, Any]) -> None:
    v = msg.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:  # 1.0 and True are not 1 here
        raise ProtocolError(
            f"protocol version {v!r} is not supported (this node speaks {PROTOCOL_VERSION})"
        )
    mtype = msg.get("type")
    if not isinstance(mtype, str) or mtype not in SCHEMAS:
        raise ProtocolError(f"unknown message type {mtype!r}")
    schema = SCHEMAS[mtype]
    for name, value in msg.items():
        if name in ("v", "type", "id"):
            continue
        if name not in schema:
            raise ProtocolError(f"{mtype}: unknown field {name!r}")
        types, limit, _ = schema[name]
        if isinstance(value, bool) and types is int:
            raise ProtocolError(f"{mtype}.{name}: expected int, got bool")
        if not isinstance(value, types):
            raise ProtocolError(
                f"{mtype}.{name}: expected {getattr(types, '__name__', types)}, "
                f"got {type(value).__name__}"
            )
        if limit is not None and hasattr(value, "__len__") and len(value) > limit:
            raise ProtocolError(
                f"{mtype}.{name}: {len(value)} items/bytes, over the limit of {limit}"
            )
        if isinstance(value, str) and "\0" in value:
            raise ProtocolError(f"{mtype}.{name}: contains a NUL byte")
        check = _VALUE_CHECKS.get((mtype, name))
        if check is not None and (problem := check(value)) is not None:
            raise ProtocolError(f"{mtype}.{name}: {problem}")
    for name, (_, _, required) in schema.items():
        if required and name not in msg:
            raise ProtocolError(f"{mtype}: missing field {name!r}")
    rid = msg.get("id")
    if "id" in msg and (not isinstance(rid, (int, str)) or isinstance(rid, bool)):
        raise ProtocolError(f"{mtype}.id: must be an int or a string")
    if mtype in STATE_CHANGING:
        low, high = REQUEST_ID_LEN
        if not isinstance(rid, str) or not low <= len(rid) <= high or "\0" in rid:
            raise ProtocolError(
                f"{mtype}.id: a {mtype} request needs a unique string id of {low} to {high} "
                "characters (e.g. random hex), so that a resent copy is refused"
            )


def error(code: str, message: str, **extra: Any) -> list[bytes]:
    """An ``error`` reply."""
    return encode("error", code=code, message=message[: 1 << 20], **extra)
