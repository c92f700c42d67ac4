"""The cluster state store against real backends: flock'd files, and real etcd members.

What is proved: of racing claimants and transfers exactly one wins and the losers learn
who; a member whose lease is not renewed becomes ``lost`` within two TTLs; leadership
passes on when the leader's process dies or its lease is revoked, with a larger token; the
event log keeps order; IP leases never give one address twice; etcd without quorum refuses
writes with an error that says so, and works again when its members return; a client
without the cluster's certificate, or without a node's CURVE-derived credentials, cannot
change ownership.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import requests

from migrate.cluster_state import (
    ClusterState,
    MemberLost,
    MemberStatus,
    NoAddressFree,
    NotLeader,
    OwnershipConflict,
    StaleRevision,
    StateAuthError,
    StateUnavailable,
)
from migrate.cluster_state import etcd as etcd_backend
from migrate.cluster_state.pki import etcd_password, issue_client, make_ca
from migrate.config import Cluster, load_cluster
from migrate.errors import NodeConfigError
from tests.helpers.etcd import ADMIN, StateCluster, wait_until

REPO = Path(__file__).resolve().parents[2]
TTL_S = 2.0  # the fixtures' membership TTL


def _race(fns: list[Callable[[], Any]]) -> list[Any]:
    """Run ``fns`` at once (released together by a barrier); each result or exception."""
    barrier = threading.Barrier(len(fns))

    def run(fn: Callable[[], Any]) -> Any:
        barrier.wait()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - the race's loser is the point
            return e

    with ThreadPoolExecutor(len(fns)) as pool:
        return list(pool.map(run, fns))


def test_racing_claims_have_exactly_one_winner(state: StateCluster) -> None:
    stores = {n: state.open(n) for n in ("node1", "node2", "node3")}
    for i in range(10):
        cid = f"c{i:02d}"
        results = _race([partial(s.claim, cid, n) for n, s in stores.items()])
        winners = [r for r in results if not isinstance(r, Exception)]
        losers = [r for r in results if isinstance(r, OwnershipConflict)]
        assert len(winners) == 1 and len(losers) == 2, results
        owner = stores["node1"].owner(cid)
        assert owner is not None and owner == winners[0]
        assert all(e.owner == owner.node and e.revision == owner.revision for e in losers)
        assert owner.node in str(losers[0])
        # the winner's claim again is the same claim, not a new revision
        assert stores[owner.node].claim(cid, owner.node) == owner


def test_transfer_is_a_compare_and_swap(state: StateCluster) -> None:
    stores = {n: state.open(n) for n in ("node1", "node2", "node3")}
    s1, s2, s3 = stores.values()
    first = s1.claim("web", "node1")
    assert s2.owner("web") == first
    # two destinations race for the same revision: exactly one CAS applies
    results = _race(
        [
            lambda: s1.transfer("web", "node1", "node2", first.revision),
            lambda: s3.transfer("web", "node1", "node3", first.revision),
        ]
    )
    won = [r for r in results if not isinstance(r, Exception)]
    lost = [r for r in results if isinstance(r, StaleRevision)]
    assert len(won) == 1 and len(lost) == 1, results
    now = s1.owner("web")
    assert now is not None
    assert now == won[0] and now.revision > first.revision
    assert lost[0].owner == now.node and lost[0].expected_revision == first.revision
    # the old token fences the old owner out for good
    with pytest.raises(StaleRevision, match=f"{now.node} owns it"):
        s1.transfer("web", "node1", "node2", first.revision)
    with pytest.raises(StaleRevision):
        s1.transfer("web", "node1", now.node, now.revision)  # right revision, wrong owner
    # release: only by the owner, then a claim starts over with a larger revision
    with pytest.raises(OwnershipConflict):
        s1.release("web", "node1")
    assert stores[now.node].release("web", now.node, now.revision)
    assert s1.owner("web") is None and not s1.release("web", "node1")
    again = s1.claim("web", "node1")
    assert again.revision > now.revision
    assert s1.owned_by("node1") == {"web": again}


def test_a_member_not_renewed_is_lost_within_two_ttls(state: StateCluster) -> None:
    s1, s2 = state.open("node1"), state.open("node2")
    assert s1.register("node1", TTL_S).status is MemberStatus.READY
    s2.register("node2", TTL_S)
    s1.renew("node1")
    s2.set_draining("node2", True)
    status = {m.name: m.status for m in s1.members()}
    assert status == {"node1": MemberStatus.READY, "node2": MemberStatus.DRAINING}

    # node1 stops renewing; node2 keeps renewing
    def node1_lost() -> bool:
        s2.renew("node2")
        return {m.name: m.status for m in s2.members()}["node1"] is MemberStatus.LOST

    wait_until(node1_lost, 2 * TTL_S, "node1 lost after it stopped renewing")
    assert {m.name: m.status for m in s2.members()}["node2"] is MemberStatus.DRAINING
    with pytest.raises(MemberLost, match="node1"):
        s1.renew("node1")
    # it comes back by registering again
    assert s1.register("node1", TTL_S).status is MemberStatus.READY
    assert {m.name: m.status for m in s2.members()}["node1"] is MemberStatus.READY
    s1.deregister("node1")
    assert {m.name: m.status for m in s2.members()}["node1"] is MemberStatus.LOST


_LEADER = """
import sys, time
from migrate.config import Cluster, load_cluster
from migrate.errors import NodeConfigError
from migrate import keys
from migrate.cluster_state import open_state
cluster_file, node, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3])
c = load_cluster(cluster_file)
secret = keys.load_secret(f"{c.source.parent}/keys/{node}.key_secret")[1]
lead = open_state(c, node, secret).campaign("balancer", node, ttl_s=ttl, timeout_s=30)
print(lead.token, flush=True)
time.sleep(600)
"""


def test_leadership_passes_on_when_the_leader_dies(state: StateCluster) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _LEADER, str(state.cluster_file), "node1", str(TTL_S)],
        stdout=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        first_token = int(proc.stdout.readline())
        s2 = state.open("node2")
        assert s2.leader("balancer") == "node1"
        with pytest.raises(NotLeader, match="node1 still leads balancer"):
            s2.campaign("balancer", "node2", ttl_s=TTL_S, timeout_s=0.5)
        proc.send_signal(signal.SIGKILL)  # our own child
        proc.wait(timeout=30)
        # files: the kernel drops its flock at once; etcd: its lease expires after a TTL
        with s2.campaign("balancer", "node2", ttl_s=TTL_S, timeout_s=4 * TTL_S) as lead:
            assert lead.held() and lead.token > first_token
            assert s2.leader("balancer") == "node2"
        assert lead.lost.is_set() and s2.leader("balancer") is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_revoked_leader_learns_it_lost(state: StateCluster) -> None:
    if state.backend != "etcd":
        pytest.skip("a file lock cannot be taken away from a live holder")
    s1, s2 = state.open("node1"), state.open("node2")
    lead = s1.campaign("balancer", "node1", ttl_s=TTL_S, timeout_s=5)
    assert isinstance(lead, etcd_backend.EtcdLeadership)
    waiting = ThreadPoolExecutor(1)
    try:
        second = waiting.submit(s2.campaign, "balancer", "node2", TTL_S, 4 * TTL_S)
        admin = _admin_gateway(state)
        try:
            admin.revoke(lead.lease_id)  # the leader's lease is gone (as if it expired)
        finally:
            admin.close()
        new = second.result(timeout=5 * TTL_S)
        assert new.token > lead.token and s1.leader("balancer") == "node2"
        assert lead.lost.wait(2 * TTL_S), "the old leader never noticed it lost"
        assert not lead.held() and new.held()
        new.resign()
    finally:
        waiting.shutdown()


def test_the_event_log_keeps_order(state: StateCluster) -> None:
    s1, s2 = state.open("node1"), state.open(ADMIN)
    appended = []
    for i in range(6):
        store, who = (s1, "node1") if i % 2 else (s2, "node2")
        appended.append(store.append_event("balancer.decision", who, {"i": i}))
    seqs = [e.seq for e in appended]
    assert seqs == sorted(seqs) and len(set(seqs)) == 6
    got = s1.events_since(0)
    assert [e.data["i"] for e in got] == list(range(6))
    assert [e.seq for e in got] == seqs
    assert [e.data["i"] for e in s2.events_since(seqs[2])] == [3, 4, 5]
    assert [e.data["i"] for e in s2.events_since(seqs[2], limit=2)] == [3, 4]
    assert s1.events_since(seqs[-1]) == []
    with pytest.raises(ValueError, match="event kind"):
        s1.append_event("no spaces", "node1")


def test_ip_leases_never_share_an_address(state: StateCluster) -> None:
    s1, s2 = state.open("node1"), state.open("node2")
    net = "10.99.0.0/28"  # 14 hosts: the gateway .1 and 13 for containers
    results = _race([partial(s.lease_ip, net, f"c{i}") for i, s in enumerate([s1, s2] * 5)])
    assert not [r for r in results if isinstance(r, Exception)], results
    addresses = [r.address for r in results]
    assert len(set(addresses)) == 10 and "10.99.0.1" not in addresses
    assert s1.lease_ip(net, "c3") == results[3]  # the one it holds
    assert len(s2.ip_leases(net)) == 10
    with pytest.raises(NoAddressFree, match="leased to container c0"):
        s2.lease_ip(net, "other", address=results[0].address)
    for i in range(10, 13):
        s1.lease_ip(net, f"c{i}")
    with pytest.raises(NoAddressFree, match="every address"):
        s1.lease_ip(net, "c13")
    assert s2.release_ip(net, "c0") and not s2.release_ip(net, "c0")
    assert s1.lease_ip(net, "c13").address == results[0].address
    with pytest.raises(ValueError, match="not a container address"):
        s1.lease_ip(net, "c14", address="10.99.0.1")


def test_without_quorum_writes_fail_clearly_and_recover(etcd3: StateCluster) -> None:
    assert etcd3.etcd is not None
    s1 = etcd3.open("node1")
    kept = s1.claim("keep", "node1")
    leader = etcd3.etcd.leader()
    assert leader is not None
    # kill the leader and one more: one member of three is left
    victims = [etcd3.etcd.members.index(leader)]
    victims.append(next(i for i in range(3) if i not in victims))
    for i in victims:
        etcd3.etcd.kill(i)
    with pytest.raises(StateUnavailable, match="no quorum") as err:
        s1.claim("new", "node1")
    assert err.value.quorum_lost
    with pytest.raises(StateUnavailable):
        s1.ping()  # what a migration's preflight asks before it freezes anything
    # the members come back: everything works again, nothing was lost
    for i in victims:
        etcd3.etcd.start(i, wait=False)
    etcd3.etcd.wait_healthy()
    wait_until(lambda: _pings(s1), 30, "etcd answers again")
    assert s1.owner("keep") == kept
    new = s1.claim("new", "node1")
    assert s1.owner("new") == new and new.revision > kept.revision


def _pings(store: ClusterState) -> bool:
    try:
        store.ping()
    except StateUnavailable:
        return False
    return True


def _admin_gateway(state: StateCluster, **over: object) -> etcd_backend.Gateway:
    cfg = state.cluster().state
    args: dict = {
        "endpoints": cfg.endpoints,
        "ca": cfg.ca,
        "cert": cfg.cert_for(ADMIN),
        "key": cfg.key_for(ADMIN),
        "timeout_s": cfg.timeout_s,
        "user": ADMIN,
        "password": etcd_password(ADMIN, state.secret(ADMIN)),
    }
    args.update(over)
    return etcd_backend.Gateway(**args)


def _put_owner(gw: etcd_backend.Gateway, cid: str, node: str) -> None:
    key = etcd_backend.PREFIX + f"owners/{cid}"
    gw.txn([], [etcd_backend._put(key, node)])


def test_strangers_cannot_change_ownership(state: StateCluster, tmp_path: Path) -> None:
    if state.backend != "etcd":
        pytest.skip("the files backend trusts the host's file permissions")
    s1 = state.open("node1")
    mine = s1.claim("db", "node1")
    cfg = state.cluster().state
    key = etcd_backend.PREFIX + "owners/db"
    body = {"success": [etcd_backend._put(key, "evil")]}

    # 1. no client certificate: the TLS handshake is refused
    session = requests.Session()
    session.trust_env = False
    with pytest.raises(requests.exceptions.ConnectionError):
        session.post(cfg.endpoints[0] + "/v3/kv/txn", json=body, verify=str(cfg.ca), timeout=5)
    session.close()

    # 2. a certificate of another CA, for the right name and key
    other = make_ca(tmp_path / "other")
    pub = state.cluster().nodes["node2"].public_key
    fake = issue_client(other, tmp_path / "other", "node2", pub)
    gw = _admin_gateway(state, cert=fake.cert, key=fake.key, user="node2")
    with pytest.raises(StateAuthError, match="TLS"):
        _put_owner(gw, "db", "node2")
    gw.close()

    # 3. the cluster's certificate but no credentials, or a password not from node2's key
    for user, password in ((None, None), ("node2", "guessed")):
        gw = _admin_gateway(state, user=user, password=password)
        with pytest.raises(StateAuthError):
            _put_owner(gw, "db", "node2")
        gw.close()

    # 4. a real node cannot write another node's membership (RBAC), nor open as another
    s2 = state.open("node2")
    with pytest.raises(StateAuthError, match="permission denied"):
        s2.register("node1")
    with pytest.raises(NodeConfigError, match="not node1 with"):
        state.open("node1", _as_other_cert(state, "node1", "node2"))

    assert s1.owner("db") == mine


def _as_other_cert(state: StateCluster, me: str, other: str) -> Cluster:
    """The cluster file with ``me``'s etcd certificate and key replaced by ``other``'s."""
    swap = state.root / "swap"
    swap.mkdir()
    for ext in ("crt", "key"):
        (swap / f"{me}.{ext}").write_bytes((state.root / "etcd" / f"{other}.{ext}").read_bytes())
        os.chmod(swap / f"{me}.{ext}", 0o600)
    text = state.cluster_file.read_text().replace('"etcd/{name}.', '"swap/{name}.')
    path = state.cluster_file.with_name("cluster-swapped.toml")
    path.write_text(text)
    return load_cluster(path)


def test_cluster_init_with_etcd_then_provision(tmp_path: Path) -> None:
    """`jaula cluster init --state etcd` writes a PKI and [state] that a real etcd member
    runs with; `jaula cluster provision-etcd` turns auth on; then a node claims, and a
    second run of provision changes nothing."""
    from migrate.cluster_state import open_state
    from migrate.cluster_state.pki import CertFiles
    from migrate.keys import load_secret
    from tests.helpers.etcd import ETCD, EtcdCluster, Member, free_ports

    if not os.access(ETCD, os.X_OK):
        pytest.skip("etcd not installed (make setup installs etcd-server)")
    root = tmp_path / "c"
    client_port, peer_port = free_ports(2)
    jaula = [sys.executable, "-m", "migrate.cli"]
    p = subprocess.run(
        [*jaula, "cluster", "init", str(root), "--nodes", "node1,node2", "--operators", "boss",
         "--base-port", "0", "--state", "etcd",
         "--etcd-endpoints", f"https://127.0.0.1:{client_port}"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "provision-etcd" in p.stderr
    d = root / "etcd"
    ca = CertFiles(d / "ca.crt", d / "ca.key")
    etcd = EtcdCluster(tmp_path / "run", 1, ca, CertFiles(d / "boss.crt", d / "boss.key"))
    etcd.members.append(
        Member(
            "m0",
            client_port,
            peer_port,
            tmp_path / "run" / "m0.etcd",
            tmp_path / "run" / "member-0.log",
            CertFiles(d / "member-m0.crt", d / "member-m0.key"),
        )
    )
    (tmp_path / "run").mkdir()
    try:
        etcd.start()
        for _ in range(2):
            p = subprocess.run(
                [*jaula, "cluster", "provision-etcd", str(root)],
                capture_output=True, text=True, cwd=REPO, check=False,
            )  # fmt: skip
            assert p.returncode == 0, p.stderr
        cluster = load_cluster(root / "cluster.toml")
        s = open_state(cluster, "node1", load_secret(root / "keys" / "node1.key_secret")[1])
        try:
            assert s.claim("abc", "node1").node == "node1"
            assert s.owner("abc") is not None
        finally:
            s.close()
        # auth is on: a client of the CA without node1's password cannot write
        with pytest.raises(StateAuthError):
            open_state(cluster, "node1", load_secret(root / "keys" / "node2.key_secret")[1])
    finally:
        etcd.close()


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "not-applied"])
def test_a_transfer_whose_reply_is_lost_is_settled_by_the_key(
    etcd3: StateCluster, monkeypatch: pytest.MonkeyPatch, applied: bool
) -> None:
    """A commit CAS whose reply is lost (a time-out at the client, etcd may apply it later):
    the key, read back, decides.  The lost reply is injected at the client boundary (the
    first txn raises ``maybe_applied`` after, or instead of, reaching the real 3-member
    etcd): applied, the transfer returns the destination; not applied, the source's own
    compensating write fences the queued swap, so the key names the source at a newer
    revision and the old token can never move it."""
    from migrate.cluster_state import StateUnavailable
    from migrate.cluster_state import etcd as etcd_backend

    s1 = etcd3.open("node1")
    first = s1.claim("lost", "node1")
    real = etcd_backend.Gateway.txn
    calls: list[int] = []

    def lossy(self: Any, *a: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            if applied:
                real(self, *a, **kw)
            raise StateUnavailable("etcd: request timed out", maybe_applied=True)
        return real(self, *a, **kw)

    monkeypatch.setattr(etcd_backend.Gateway, "txn", lossy)
    if applied:
        moved = s1.transfer("lost", "node1", "node2", first.revision)
        assert moved.node == "node2" and moved.revision > first.revision
        assert s1.owner("lost") == moved
    else:
        with pytest.raises(StaleRevision, match="fenced"):
            s1.transfer("lost", "node1", "node2", first.revision)
        now = s1.owner("lost")
        assert now is not None and now.node == "node1" and now.revision > first.revision
        # the swap, were it applied late, compares on the old revision: it cannot hold
        monkeypatch.setattr(etcd_backend.Gateway, "txn", real)
        with pytest.raises(StaleRevision):
            s1.transfer("lost", "node1", "node2", first.revision)
        assert s1.owner("lost") == now
