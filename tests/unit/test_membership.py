"""migrate.membership against the real ``files`` backend (no root): the ownership a node's
runtime is given, and the reconcile of a node's containers with the store's claims."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from migrate.cluster_state.files import FilesState
from migrate.membership import NodeOwnership, OwnershipRefused, reconcile
from runtime.state import ContainerStatus

S = ContainerStatus


@dataclass
class _State:
    incoming: bool = False


@dataclass
class _Ctr:
    id: str
    status: ContainerStatus
    state: _State = field(default_factory=_State)


@dataclass
class _Rt:
    containers: list[_Ctr]

    def list(self, all: bool = False) -> list[_Ctr]:
        return list(self.containers)


def test_claim_is_new_once_and_another_nodes_claim_refuses(tmp_path: Path) -> None:
    store = FilesState(tmp_path)
    n1, n2 = NodeOwnership(store, "node1"), NodeOwnership(store, "node2")
    assert n1.claim("c1") is True
    assert n1.claim("c1") is False  # already its own: not new
    with pytest.raises(OwnershipRefused, match="owned by node node1") as e:
        n2.claim("c1")
    assert "\n" not in str(e.value)
    n2.release("c1")  # another node's claim stays, silently
    assert store.owner("c1") is not None
    n1.release("c1")
    assert store.owner("c1") is None
    assert n2.claim("c1") is True


def test_an_unwritable_store_refuses_the_claim(tmp_path: Path) -> None:
    class Down(FilesState):
        def owner(self, container_id: str) -> Any:
            from migrate.cluster_state import StateUnavailable

            raise StateUnavailable("etcd at https://127.0.0.1:1 did not answer")

    with pytest.raises(OwnershipRefused, match="cluster state is unavailable"):
        NodeOwnership(Down(tmp_path), "node1").claim("c1")


def test_reconcile_claims_what_runs_here_and_releases_what_is_gone(tmp_path: Path) -> None:
    store = FilesState(tmp_path)
    store.claim("gone", "node1")  # removed while the store was away
    store.claim("left", "node1")  # migrated away, the record kept
    store.claim("theirs", "node2")  # a conflict: left alone
    rt = _Rt(
        [
            _Ctr("runs", S.RUNNING),
            _Ctr("stopped", S.STOPPED),
            _Ctr("left", S.MIGRATED),
            _Ctr("arriving", S.MIGRATING, _State(incoming=True)),
            _Ctr("theirs", S.RUNNING),
        ]
    )
    counts = reconcile(rt, store, "node1")  # type: ignore[arg-type]
    assert counts == {"claimed": 2, "released": 2, "conflicts": 1}
    assert sorted(store.owned_by("node1")) == ["runs", "stopped"]
    owner = store.owner("theirs")
    assert owner is not None and owner.node == "node2"
    assert store.owner("arriving") is None  # its claim comes with the commit
