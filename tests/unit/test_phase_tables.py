"""The migration's phase tables (migrate.protocol) and the runtime's typed records
(runtime.state): every message and phase is covered, order is checked, old records read."""

from __future__ import annotations

import pytest

from migrate.errors import ProtocolError
from migrate.protocol import (
    DESTINATION_TABLE,
    NODE_MESSAGES,
    OPERATOR_REQUESTS,
    SCHEMAS,
    SOURCE_PLAN,
    SOURCE_TABLE,
    DestinationPhase,
    MessageType,
    SourcePhase,
    Strategy,
    next_phase,
)
from runtime.errors import InvalidStateTransition
from runtime.state import (
    OPERATIONS,
    TRANSITIONS,
    ContainerStatus,
    MigrationDirection,
    MigrationRecord,
    Operation,
    PostcopyRecord,
    State,
    can,
    require,
)


def test_every_message_type_has_a_schema_and_back() -> None:
    assert set(SCHEMAS) == {m.value for m in MessageType}


def test_every_phase_has_a_row_and_every_target_is_a_phase() -> None:
    assert set(SOURCE_TABLE) == set(SourcePhase)
    assert set(DESTINATION_TABLE) == set(DestinationPhase)
    for row in SOURCE_TABLE.values():
        assert all(t is None or isinstance(t, SourcePhase) for t in row.values())
    for drow in DESTINATION_TABLE.values():
        assert all(isinstance(t, DestinationPhase) for t in drow.values())


def test_plans_name_the_commit_point_once_and_end_with_cleanup() -> None:
    for strategy in Strategy:
        plan = SOURCE_PLAN[strategy]
        assert plan.count(SourcePhase.COMMIT) == 1
        assert plan[0] is SourcePhase.PREFLIGHT and plan[-1] is SourcePhase.CLEANUP
        assert plan.index(SourcePhase.RESTORE) < plan.index(SourcePhase.COMMIT)
    assert SourcePhase.POSTCOPY in SOURCE_PLAN[Strategy.POSTCOPY]
    assert SourcePhase.POSTCOPY not in SOURCE_PLAN[Strategy.COLD]


def test_sessions_messages_are_for_nodes_and_requests_for_operators() -> None:
    assert not (NODE_MESSAGES & OPERATOR_REQUESTS)
    taken = {m for row in DESTINATION_TABLE.values() for m in row}
    assert taken <= NODE_MESSAGES


@pytest.mark.parametrize(
    ("phase", "mtype"),
    [
        (DestinationPhase.RECEIVING, "resume"),  # resume before the restore was held
        (DestinationPhase.HELD, "file_begin"),  # a file after the restore
        (DestinationPhase.HELD, "restore"),  # a second restore
        (DestinationPhase.DONE, "abort"),
        (DestinationPhase.RECEIVING, "nonsense"),
    ],
)
def test_out_of_order_messages_are_protocol_errors(phase: DestinationPhase, mtype: str) -> None:
    with pytest.raises(ProtocolError, match=f"{mtype} is out of order.*phase {phase.value}"):
        next_phase(DESTINATION_TABLE, phase, mtype, "destination")


def test_in_order_messages_lead_on() -> None:
    assert next_phase(DESTINATION_TABLE, DestinationPhase.RECEIVING, "restore", "d") is (
        DestinationPhase.HELD
    )
    assert next_phase(DESTINATION_TABLE, DestinationPhase.HELD, "resume", "d") is (
        DestinationPhase.DONE
    )
    assert next_phase(SOURCE_TABLE, SourcePhase.RESTORE, "ready", "s") is SourcePhase.COMMIT
    with pytest.raises(ProtocolError):
        next_phase(SOURCE_TABLE, SourcePhase.PRECOPY, "ready", "s")  # ready before a restore


def test_operations_are_transitions() -> None:
    for op, (froms, to) in OPERATIONS.items():
        for f in froms:
            assert to is None or to in TRANSITIONS[f], (op, f, to)


def test_require_names_the_status_and_the_operation() -> None:
    assert can(Operation.CHECKPOINT, ContainerStatus.RUNNING)
    assert not can(Operation.CHECKPOINT, ContainerStatus.STOPPED)
    with pytest.raises(InvalidStateTransition, match="stopped.*checkpoint"):
        require(Operation.CHECKPOINT, "a" * 64, ContainerStatus.STOPPED)


def test_state_round_trips_its_records() -> None:
    st = State(
        status=ContainerStatus.MIGRATING,
        migration=MigrationRecord("0123456789abcdef", MigrationDirection.INCOMING, "node1"),
        postcopy=PostcopyRecord("0123456789abcdef", "node1", 42, 1000),
        restored_at=5.0,
    )
    back = State.from_json(st.to_json())
    assert back == st
    assert back.incoming and not back.outgoing


def test_state_written_before_the_typed_records_is_read() -> None:
    incoming = State.from_json(
        {"status": "migrating", "extra": {"session": "s1", "from": "node1", "restored_at": 7}}
    )
    assert incoming.migration == MigrationRecord("s1", MigrationDirection.INCOMING, "node1")
    assert incoming.incoming and incoming.restored_at == 7.0
    migrated = State.from_json(
        {
            "status": "migrated",
            "migrated_to": "node2",
            "extra": {"session": "s2", "migrated_at": 9.5},
        }
    )
    assert migrated.migration == MigrationRecord("s2", MigrationDirection.OUTGOING, "node2", 9.5)
    outgoing = State.from_json({"status": "migrating", "extra": {"session": "s3"}})
    assert outgoing.outgoing and not outgoing.incoming
