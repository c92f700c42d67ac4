"""The ``etcd`` backend: the cluster state in etcd 3.4+, through its gRPC gateway.

The only module of jaula that talks to etcd.  The client is etcd3gw (OpenStack's, kept up
to date and typed): JSON over HTTPS to etcd's gRPC gateway, so no generated protobuf code
meets pycriu's (the ``etcd3`` package's modules, made by an old protoc, do not import
under protobuf >= 4, and it has not been released since 2020).  etcd3gw gives the TLS
session, the URL of the v3 API and its error classes; the transactions are built here,
because the commit point needs compares on ``mod_revision`` and the revision of the reply.

Keys (``P`` = ``/jaula/``; values UTF-8, JSON where marked)::

    P nodes/NODE            {"registered": T, "draining": B}          no lease: stays when lost
    P alive/NODE            {"since": T}                              on NODE's lease
    P owners/ID             NODE           mod_revision = the fencing token
    P ips/SUBNET/ADDRESS    ID             SUBNET with "/" as "_" (10.88.0.0_16)
    P leaders/NAME          NODE           on the leader's lease; create_revision = token
    P events/TIME-NODE-RND  {"time", "kind", "node", "data"}          seq = mod_revision

Every ownership change is one transaction: ``claim`` creates the key only if its
create_revision is 0; ``transfer`` puts the new owner only if the key still holds the old
one at the expected mod_revision; the reply's header revision is the new token.

Security (see :mod:`migrate.cluster_state.pki`): etcd runs with ``--client-cert-auth
--trusted-ca-file`` (no certificate of the cluster's CA, no connection) and with auth on;
each node is etcd user NODE whose password is derived from its CURVE secret key, with role
``jaula-node-NODE``: read all of ``P``, write its own ``nodes/`` and ``alive/`` keys and
the shared ``owners/ ips/ leaders/ events/`` prefixes.  Operators (the balancer, the CLI)
get ``jaula-operator``: read and write all of ``P``.  :func:`provision` sets this up.

Failures: a member that does not answer is skipped for the next endpoint; when none can
serve, :class:`~migrate.cluster_state.StateUnavailable` says whether etcd answered without
a leader (quorum lost) or nothing answered.  A write that timed out may still be applied
later by etcd (the raft entry can commit when quorum returns): its error says so
(``maybe_applied``), and the caller must read the key before it decides.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import etcd3gw
import etcd3gw.exceptions
import requests
import structlog

from migrate.cluster_state import (
    ClusterStateError,
    Event,
    IpLease,
    Member,
    MemberLost,
    MemberStatus,
    NoAddressFree,
    NotLeader,
    Owner,
    OwnershipConflict,
    StaleRevision,
    StateAuthError,
    StateUnavailable,
)
from migrate.cluster_state.common import (
    canonical_subnet,
    check_address,
    check_container_id,
    check_election,
    check_kind,
    check_node,
    pick_address,
)
from migrate.cluster_state.pki import check_client_cert, etcd_password
from migrate.config import Cluster, StateBackend, StateConfig
from migrate.errors import NodeConfigError
from runtime.poll import wait_for

log = structlog.get_logger(__name__)

PREFIX = "/jaula/"
ROOT_USER = "root"
OPERATOR_ROLE = "jaula-operator"
_SHARED = ("owners/", "ips/", "leaders/", "events/")


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode("ascii")


def _unb64(s: str) -> str:
    return base64.b64decode(s).decode()


def _prefix_end(prefix: str) -> str:
    """etcd's range_end for every key starting with ``prefix`` (last byte + 1)."""
    b = bytearray(prefix.encode())
    b[-1] += 1
    return _b64(bytes(b))


def _detail(e: etcd3gw.exceptions.Etcd3Exception) -> str:
    """etcd's own error text from a gateway reply (``etcdserver: permission denied``)."""
    text = e.detail_text or ""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip() or str(e)
    if isinstance(body, dict):
        return str(body.get("error") or body.get("message") or text)
    return text


class Gateway:
    """etcd's members through their gRPC gateways: failover, auth token, error mapping.

    Args:
        endpoints: ``https://HOST:PORT`` of each member.
        ca, cert, key: the cluster CA, our client certificate and key (PEM paths).
        timeout_s: the longest one request may take.
        user, password: our etcd user (None: no auth, as before :func:`provision`).
    """

    def __init__(
        self,
        endpoints: Collection[str],
        ca: Path,
        cert: Path,
        key: Path,
        timeout_s: float,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        self.endpoints = list(endpoints)
        self.timeout_s = timeout_s
        self._user = user
        self._password = password
        self._token: str | None = None
        self._lock = threading.Lock()
        self._cur = 0
        self._clients = []
        for e in self.endpoints:
            host, _, port = e.removeprefix("https://").rpartition(":")
            session = requests.Session()
            # no proxy and no CA bundle from the environment ($REQUESTS_CA_BUNDLE would
            # replace our CA, $HTTPS_PROXY would send etcd's traffic elsewhere)
            session.trust_env = False
            session.verify = str(ca)
            session.cert = (str(cert), str(key))
            self._clients.append(
                etcd3gw.Etcd3Client(
                    host=host.strip("[]"),
                    port=int(port),
                    protocol="https",
                    timeout=timeout_s,
                    api_path="/v3/",  # etcd >= 3.4; no discovery round trip
                    session=session,
                )
            )

    def close(self) -> None:
        for c in self._clients:
            c.session.close()

    def authenticate(self) -> None:
        """Get a token for our user (StateAuthError when etcd refuses the password)."""
        if self._user is None:
            return
        with self._lock:  # an old token would make etcd refuse the authentication itself
            self._token = None
            for c in self._clients:
                c.session.headers.pop("Authorization", None)
        reply = self.call(
            "/auth/authenticate", {"name": self._user, "password": self._password}, auth=False
        )
        with self._lock:
            self._token = str(reply["token"])
            for c in self._clients:
                c.session.headers["Authorization"] = self._token

    def call(self, path: str, body: Mapping[str, Any], auth: bool = True) -> dict[str, Any]:
        """POST ``body`` to ``/v3`` + ``path`` on the first member that answers; returns the
        reply.  Errors: StateAuthError, StateUnavailable, ClusterStateError (etcd's text)."""
        if auth and self._user is not None and self._token is None:
            self.authenticate()
        last: Exception | None = None
        maybe_applied = False
        reauthed = False
        tried = tls_refused = 0
        while tried < len(self._clients):
            i = self._cur
            c = self._clients[i]
            try:
                result: dict[str, Any] = c.post(c.get_url(path), json=dict(body))
                return result
            except etcd3gw.exceptions.ConnectionTimeoutError as e:
                last, maybe_applied = e, True
            except etcd3gw.exceptions.ConnectionFailedError as e:
                text = f"{e} {_detail(e)}"
                low = text.lower()
                # the member is up but the TLS handshake failed: an alert, a bad
                # certificate, or the member closing on a certificate it does not trust
                # (a member dying in the handshake looks the same: try the others first)
                if "sslerror" in low or "certificate" in low or "alert" in low:
                    tls_refused += 1
                    if tls_refused == len(self._clients):
                        raise StateAuthError(
                            f"etcd at {', '.join(self.endpoints)} refused our TLS handshake "
                            f"({text.strip()}): check [state] ca, cert and key (a certificate "
                            "of the cluster's etcd CA)"
                        ) from e
                # 503 from etcd (no leader, request timed out) or no connection at all
                last = e
                maybe_applied = maybe_applied or "timed out" in text
            except etcd3gw.exceptions.Etcd3Exception as e:
                d = _detail(e)
                if auth and not reauthed and ("auth token" in d or "revision in header" in d):
                    reauthed = True
                    self.authenticate()
                    continue
                if "permission denied" in d or "user name" in d or "authentication failed" in d:
                    raise StateAuthError(
                        f"etcd refused {path} for user {self._user or '(none)'}: {d}"
                    ) from e
                if "no leader" in d or "timed out" in d:
                    last, maybe_applied = e, maybe_applied or "timed out" in d
                else:
                    raise ClusterStateError(f"etcd {path}: {d}") from e
            with self._lock:
                self._cur = (i + 1) % len(self._clients)
            tried += 1
        raise self._unavailable(path, last, maybe_applied)

    def _unavailable(self, path: str, last: Exception | None, maybe_applied: bool) -> Exception:
        answered = leaderless = 0
        for c in self._clients:
            try:
                r = c.session.post(
                    c.get_url("/maintenance/status"), json={}, timeout=min(1.0, self.timeout_s)
                )
            except requests.RequestException:
                continue
            if r.status_code == 200:
                answered += 1
                if int(r.json().get("leader", 0)) == 0:
                    leaderless += 1
        n = len(self._clients)
        why = str(last) if last is not None else "no answer"
        if isinstance(last, etcd3gw.exceptions.Etcd3Exception):
            why = _detail(last) or why
        tail = (
            "; the request may still be applied when etcd recovers: read the key again before "
            "deciding"
            if maybe_applied and path == "/kv/txn"
            else ""
        )
        if answered and (leaderless == answered or "no leader" in why or "timed out" in why):
            err = StateUnavailable(
                f"etcd has no quorum: {answered} of {n} members answer and none has a leader "
                f"({why}); writes are refused until a majority of members is back{tail}",
                quorum_lost=True,
                maybe_applied=maybe_applied,
            )
        else:
            err = StateUnavailable(
                f"etcd does not answer at {', '.join(self.endpoints)} ({answered} of {n} "
                f"members up): {why}{tail}",
                maybe_applied=maybe_applied,
            )
        return err

    # -- small helpers over call() -------------------------------------------------------------

    def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        return self.call(
            "/kv/txn", {"compare": compare, "success": success, "failure": failure or []}
        )

    def range(self, key: str, prefix: bool = False, **opts: Any) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"key": _b64(key), **opts}
        if prefix:
            body["range_end"] = _prefix_end(key)
        kvs: list[dict[str, Any]] = self.call("/kv/range", body).get("kvs", [])
        return kvs

    def grant(self, ttl_s: float) -> int:
        r = self.call("/lease/grant", {"TTL": max(1, round(ttl_s)), "ID": 0})
        if r.get("error"):
            raise ClusterStateError(f"etcd refused a lease of {ttl_s:g} s: {r['error']}")
        return int(r["ID"])

    def keepalive(self, lease: int) -> int:
        """The lease's new TTL, or -1 when it had expired."""
        r = self.call("/lease/keepalive", {"ID": lease})
        return int(r.get("result", {}).get("TTL", -1))

    def revoke(self, lease: int) -> None:
        try:
            self.call("/lease/revoke", {"ID": lease})
        except ClusterStateError as e:
            if "requested lease not found" not in str(e):
                raise


def _put(key: str, value: str, lease: int | None = None) -> dict[str, Any]:
    req: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease is not None:
        req["lease"] = lease
    return {"request_put": req}


def _get(key: str) -> dict[str, Any]:
    return {"request_range": {"key": _b64(key)}}


def _delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


def _cmp(key: str, target: str, value: Any, result: str = "EQUAL") -> dict[str, Any]:
    field = {"CREATE": "create_revision", "MOD": "mod_revision", "VALUE": "value"}[target]
    return {
        "key": _b64(key),
        "target": target,
        "result": result,
        field: _b64(value) if target == "VALUE" else str(value),
    }


def _kvs(reply: dict[str, Any], index: int) -> list[dict[str, Any]]:
    """The kvs of the ``index``-th response of a txn reply (a range)."""
    responses = reply.get("responses", [])
    if index >= len(responses):
        return []
    kvs: list[dict[str, Any]] = responses[index].get("response_range", {}).get("kvs", [])
    return kvs


def _rev(reply: dict[str, Any]) -> int:
    return int(reply["header"]["revision"])


class EtcdLeadership:
    """Leading one election on etcd: the key ``P leaders/NAME`` on our lease, kept alive by a
    thread; ``lost`` is set when a renewal finds the lease or the key gone, or when the store
    has not answered for a whole TTL."""

    def __init__(
        self, state: EtcdState, name: str, node: str, lease: int, token: int, ttl_s: float
    ) -> None:
        self.name = name
        self.node = node
        self.token = token
        self.lost = threading.Event()
        self._state = state
        self._lease = lease
        self._ttl_s = ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name=f"jaula-leader-{name}", daemon=True)
        self._thread.start()

    @property
    def lease_id(self) -> int:
        """The etcd lease the leader key is on."""
        return self._lease

    def held(self) -> bool:
        return not self.lost.is_set()

    def _keep(self) -> None:
        key = PREFIX + f"leaders/{self.name}"
        ok_at = time.monotonic()
        while not self._stop.wait(self._ttl_s / 3):
            try:
                alive = self._state._gw.keepalive(self._lease) > 0
                kvs = self._state._gw.range(key) if alive else []
                mine = bool(kvs) and int(kvs[0]["create_revision"]) == self.token
            except ClusterStateError as e:
                if time.monotonic() - ok_at < self._ttl_s:
                    continue
                log.warning("leadership lost: store unreachable", name=self.name, error=str(e))
                break
            if not mine:
                log.warning("leadership lost: lease or key gone", name=self.name)
                break
            ok_at = time.monotonic()
        self.lost.set()

    def resign(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        key = PREFIX + f"leaders/{self.name}"
        try:
            self._state._gw.txn([_cmp(key, "CREATE", self.token)], [_delete(key)])
            self._state._gw.revoke(self._lease)
        except ClusterStateError as e:
            log.warning("resign: could not remove the leader key", name=self.name, error=str(e))
        finally:
            self.lost.set()
            self._state._held.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.resign()


class EtcdState:
    """The ``etcd`` backend (layout and rules in the module docstring).

    Use :meth:`open` (from a cluster file), or the constructor with a :class:`Gateway`.
    """

    backend = StateBackend.ETCD

    def __init__(self, gateway: Gateway, ttl_s: float) -> None:
        self._gw = gateway
        self.ttl_s = ttl_s
        self._leases: dict[str, int] = {}  # node -> its membership lease (this client's)
        self._held: set[EtcdLeadership] = set()

    @classmethod
    def open(cls, cluster: Cluster, name: str, secret_key: bytes | None) -> EtcdState:
        """Connect as node or operator ``name`` of ``cluster`` (see
        :func:`migrate.cluster_state.open_state` for the arguments and errors)."""
        cfg = cluster.state
        peer = cluster.nodes.get(name) or cluster.operators.get(name)
        where = cluster.source or "the cluster"
        if peer is None:
            raise NodeConfigError(
                f"{name!r} is neither a node nor an operator of {where}: only they may use its etcd"
            )
        if secret_key is None:
            raise NodeConfigError(
                f"{name}: the etcd backend needs {name}'s CURVE secret key (its etcd password "
                "is derived from it)"
            )
        cert, key = cfg.cert_for(name), cfg.key_for(name)
        assert cfg.ca is not None  # the loader requires it for etcd
        for what, p in (("ca", cfg.ca), ("cert", cert), ("key", key)):
            if not p.is_file():
                raise NodeConfigError(
                    f"{where}: [state] {what}: {p} does not exist: issue {name}'s etcd "
                    "client certificate (migrate.cluster_state.pki) or fix the path",
                    path=str(where),
                    key=f"state.{what}",
                )
        check_client_cert(cert, name, peer.public_key)
        gw = Gateway(
            cfg.endpoints, cfg.ca, cert, key, cfg.timeout_s, name, etcd_password(name, secret_key)
        )
        try:
            gw.authenticate()
        except BaseException:
            gw.close()
            raise
        return cls(gw, cfg.ttl_s)

    def close(self) -> None:
        for lead in list(self._held):
            lead.resign()
        self._gw.close()

    def ping(self) -> None:
        """A linearizable read: returns when etcd has quorum, else StateUnavailable."""
        self._gw.range(PREFIX + "ping")

    # -- membership ---------------------------------------------------------------------------

    def register(self, node: str, ttl_s: float | None = None) -> Member:
        check_node(node)
        lease = self._gw.grant(self.ttl_s if ttl_s is None else ttl_s)
        old = self._leases.pop(node, None)
        if old is not None:
            self._gw.revoke(old)
        rec_key, alive_key = PREFIX + f"nodes/{node}", PREFIX + f"alive/{node}"
        now = time.time()
        while True:
            kvs = self._gw.range(rec_key)
            draining = bool(kvs and json.loads(_unb64(kvs[0]["value"])).get("draining"))
            rec = json.dumps({"registered": now, "draining": draining})
            guard = _cmp(rec_key, "MOD", kvs[0]["mod_revision"] if kvs else 0)
            r = self._gw.txn(
                [guard], [_put(rec_key, rec), _put(alive_key, json.dumps({"since": now}), lease)]
            )
            if r.get("succeeded"):
                break
        self._leases[node] = lease
        return Member(node, MemberStatus.DRAINING if draining else MemberStatus.READY, now)

    def renew(self, node: str) -> None:
        check_node(node)
        lease = self._leases.get(node)
        if lease is None:
            raise MemberLost(f"node {node} is not registered by this client: register it", node)
        if self._gw.keepalive(lease) <= 0:
            self._leases.pop(node, None)
            raise MemberLost(
                f"node {node}'s membership lease expired: register again and reconcile its "
                "containers",
                node,
            )

    def set_draining(self, node: str, draining: bool) -> None:
        check_node(node)
        key = PREFIX + f"nodes/{node}"
        while True:
            kvs = self._gw.range(key)
            if not kvs:
                raise MemberLost(f"node {node} never registered", node)
            rec = json.loads(_unb64(kvs[0]["value"]))
            rec["draining"] = bool(draining)
            r = self._gw.txn(
                [_cmp(key, "MOD", kvs[0]["mod_revision"])], [_put(key, json.dumps(rec))]
            )
            if r.get("succeeded"):
                return

    def deregister(self, node: str) -> None:
        check_node(node)
        lease = self._leases.pop(node, None)
        if lease is not None:
            self._gw.revoke(lease)

    def members(self) -> list[Member]:
        r = self._gw.txn(
            [],
            [
                {
                    "request_range": {
                        "key": _b64(PREFIX + "nodes/"),
                        "range_end": _prefix_end(PREFIX + "nodes/"),
                    }
                },
                {
                    "request_range": {
                        "key": _b64(PREFIX + "alive/"),
                        "range_end": _prefix_end(PREFIX + "alive/"),
                        "keys_only": True,
                    }
                },
            ],
        )
        alive = {_unb64(kv["key"]).rsplit("/", 1)[1] for kv in _kvs(r, 1)}
        out = []
        for kv in _kvs(r, 0):
            name = _unb64(kv["key"]).rsplit("/", 1)[1]
            rec = json.loads(_unb64(kv["value"]))
            if name not in alive:
                status = MemberStatus.LOST
            elif rec.get("draining"):
                status = MemberStatus.DRAINING
            else:
                status = MemberStatus.READY
            out.append(Member(name, status, float(rec.get("registered", 0))))
        return sorted(out, key=lambda m: m.name)

    # -- ownership ----------------------------------------------------------------------------

    def claim(self, container_id: str, node: str) -> Owner:
        check_container_id(container_id)
        check_node(node)
        key = PREFIX + f"owners/{container_id}"
        r = self._gw.txn([_cmp(key, "CREATE", 0)], [_put(key, node)], [_get(key)])
        if r.get("succeeded"):
            return Owner(node, _rev(r))
        kvs = _kvs(r, 0)
        if not kvs:  # released between the compare and the read: cannot be, but say so
            raise ClusterStateError(f"claim of {container_id}: etcd replied without the key")
        cur = _unb64(kvs[0]["value"])
        rev = int(kvs[0]["mod_revision"])
        if cur == node:
            return Owner(node, rev)
        raise OwnershipConflict(
            f"container {container_id} is owned by node {cur} (revision {rev}), not {node}: "
            f"it runs (or may run) there; move it with `jaula migrate` or release it on {cur} "
            "first",
            container_id,
            cur,
            rev,
        )

    def transfer(
        self, container_id: str, from_node: str, to_node: str, expected_revision: int
    ) -> Owner:
        check_container_id(container_id)
        check_node(from_node)
        check_node(to_node)
        key = PREFIX + f"owners/{container_id}"
        try:
            r = self._gw.txn(
                [_cmp(key, "MOD", expected_revision), _cmp(key, "VALUE", from_node)],
                [_put(key, to_node)],
                [_get(key)],
            )
        except StateUnavailable as e:
            if not e.maybe_applied:
                raise
            return self._settle_transfer(container_id, from_node, to_node, expected_revision, e)
        if r.get("succeeded"):
            return Owner(to_node, _rev(r))
        kvs = _kvs(r, 0)
        cur = _unb64(kvs[0]["value"]) if kvs else None
        rev = int(kvs[0]["mod_revision"]) if kvs else 0
        now = "nobody owns it" if cur is None else f"{cur} owns it at revision {rev}"
        raise StaleRevision(
            f"container {container_id}: expected {from_node} at revision {expected_revision}, "
            f"but {now}: another writer came first",
            container_id,
            cur,
            rev,
            expected_revision,
        )

    def _settle_transfer(
        self,
        container_id: str,
        from_node: str,
        to_node: str,
        expected_revision: int,
        first: StateUnavailable,
    ) -> Owner:
        """Decide a transfer whose reply was lost (``first.maybe_applied``): etcd may still
        apply it later, so the key, not the error, says how the migration ends.

        The rule, until a deadline of twice the client timeout:

        - the key names ``to_node`` above ``expected_revision``: the swap was applied, the
          migration is committed (returns the new owner; the destination resumes);
        - the key still names ``from_node`` at ``expected_revision``: the swap may be queued
          in raft, so we fence it with a compensating write, ``from_node`` put again under
          the same compare (``mod_revision == expected_revision``).  That write bumps the
          key's mod_revision, so the late swap's compare can no longer hold: if ours
          succeeds, the migration is rolled back for certain (raises StaleRevision naming
          ``from_node`` at its new revision, which the source takes as its rollback); if it
          fails, the swap came first and the key is read again;
        - anything else (another owner, no key): StaleRevision, rolled back.

        Raises ``first`` (still ``maybe_applied``) when the store cannot be reached by the
        deadline: the outcome is then unknown here, and the node's reconciliation against
        the store (at its next start, or the outcome query) settles which copy lives."""
        key = PREFIX + f"owners/{container_id}"
        deadline = time.monotonic() + 2 * self._gw.timeout_s
        while time.monotonic() < deadline:
            try:
                after = self.owner(container_id)
                if (
                    after is not None
                    and after.node == to_node
                    and after.revision > expected_revision
                ):
                    log.info(
                        "state.transfer.applied_late", id=container_id, revision=after.revision
                    )
                    return after
                if after is None or after.node != from_node or after.revision != expected_revision:
                    raise StaleRevision(
                        f"container {container_id}: after a lost reply the owner is "
                        f"{after.node if after else 'nobody'}, not {to_node}: rolled back",
                        container_id,
                        after.node if after else None,
                        after.revision if after else 0,
                        expected_revision,
                    )
                r = self._gw.txn(
                    [_cmp(key, "MOD", expected_revision), _cmp(key, "VALUE", from_node)],
                    [_put(key, from_node)],
                    [_get(key)],
                )
            except StateUnavailable:
                time.sleep(0.1)
                continue
            if r.get("succeeded"):
                raise StaleRevision(
                    f"container {container_id}: the move to {to_node} timed out and was "
                    f"fenced: {from_node} owns it at revision {_rev(r)}; rolled back",
                    container_id,
                    from_node,
                    _rev(r),
                    expected_revision,
                )
        raise first

    def owner(self, container_id: str) -> Owner | None:
        check_container_id(container_id)
        kvs = self._gw.range(PREFIX + f"owners/{container_id}")
        return Owner(_unb64(kvs[0]["value"]), int(kvs[0]["mod_revision"])) if kvs else None

    def release(self, container_id: str, node: str, expected_revision: int | None = None) -> bool:
        check_container_id(container_id)
        check_node(node)
        key = PREFIX + f"owners/{container_id}"
        cmp = [_cmp(key, "VALUE", node)]
        if expected_revision is not None:
            cmp.append(_cmp(key, "MOD", expected_revision))
        r = self._gw.txn(cmp, [_delete(key)], [_get(key)])
        if r.get("succeeded"):
            return True
        kvs = _kvs(r, 0)
        if not kvs:
            return False
        cur, rev = _unb64(kvs[0]["value"]), int(kvs[0]["mod_revision"])
        if cur != node:
            raise OwnershipConflict(
                f"container {container_id} is owned by node {cur} (revision {rev}), not {node}: "
                f"release it on {cur}",
                container_id,
                cur,
                rev,
            )
        raise StaleRevision(
            f"container {container_id}: {node} owns it at revision {rev}, not {expected_revision}",
            container_id,
            cur,
            rev,
            expected_revision or 0,
        )

    def owned_by(self, node: str) -> dict[str, Owner]:
        check_node(node)
        out = {}
        for kv in self._gw.range(PREFIX + "owners/", prefix=True):
            if _unb64(kv["value"]) == node:
                cid = _unb64(kv["key"]).rsplit("/", 1)[1]
                out[cid] = Owner(node, int(kv["mod_revision"]))
        return dict(sorted(out.items()))

    # -- IP leases ----------------------------------------------------------------------------

    def _ip_prefix(self, subnet: str) -> tuple[Any, str]:
        net = canonical_subnet(subnet)
        return net, PREFIX + f"ips/{str(net).replace('/', '_')}/"

    def _ip_map(self, prefix: str) -> dict[str, str]:
        return {
            _unb64(kv["key"])[len(prefix) :]: _unb64(kv["value"])
            for kv in self._gw.range(prefix, prefix=True)
        }

    def lease_ip(self, subnet: str, container_id: str, address: str | None = None) -> IpLease:
        net, prefix = self._ip_prefix(subnet)
        check_container_id(container_id)
        want = None if address is None else str(check_address(net, address))
        for _ in range(64):
            used = self._ip_map(prefix)
            for a, cid in used.items():
                if cid == container_id:
                    return IpLease(str(net), a, container_id)
            if want is not None and want in used:
                raise NoAddressFree(
                    f"{want} in {net} is leased to container {used[want]}: pick another "
                    "address or none"
                )
            pick = want or pick_address(net, used)
            if pick is None:
                raise NoAddressFree(f"every address of {net} is leased: use a larger subnet")
            key = prefix + pick
            r = self._gw.txn([_cmp(key, "CREATE", 0)], [_put(key, container_id)])
            if r.get("succeeded"):
                return IpLease(str(net), pick, container_id)
        raise NoAddressFree(f"{net}: 64 attempts lost a race for an address; try again")

    def release_ip(self, subnet: str, container_id: str) -> bool:
        _, prefix = self._ip_prefix(subnet)
        check_container_id(container_id)
        done = False
        for a, cid in self._ip_map(prefix).items():
            if cid == container_id:
                key = prefix + a
                r = self._gw.txn([_cmp(key, "VALUE", container_id)], [_delete(key)])
                done = done or bool(r.get("succeeded"))
        return done

    def ip_leases(self, subnet: str) -> list[IpLease]:
        import ipaddress

        net, prefix = self._ip_prefix(subnet)
        items = sorted(
            self._ip_map(prefix).items(), key=lambda kv: int(ipaddress.ip_address(kv[0]))
        )
        return [IpLease(str(net), a, cid) for a, cid in items]

    # -- leadership ---------------------------------------------------------------------------

    def campaign(
        self, name: str, node: str, ttl_s: float | None = None, timeout_s: float | None = None
    ) -> EtcdLeadership:
        check_election(name)
        check_node(node)
        ttl = self.ttl_s if ttl_s is None else ttl_s
        key = PREFIX + f"leaders/{name}"
        lease = self._gw.grant(ttl)
        renewed = time.monotonic()

        def attempt() -> int | None:
            nonlocal lease, renewed
            if time.monotonic() - renewed > ttl / 3:  # keep our lease alive while we wait
                if self._gw.keepalive(lease) <= 0:
                    lease = self._gw.grant(ttl)
                renewed = time.monotonic()
            r = self._gw.txn([_cmp(key, "CREATE", 0)], [_put(key, node, lease)])
            return _rev(r) if r.get("succeeded") else None

        try:
            token = wait_for(attempt, timeout_s, max_interval_s=min(0.25, ttl / 4))
        except BaseException:
            self._gw.revoke(lease)
            raise
        if token is None:
            self._gw.revoke(lease)
            who = self.leader(name)
            raise NotLeader(
                f"{who or 'another node'} still leads {name} after {timeout_s:g} s", name, who
            )
        lead = EtcdLeadership(self, name, node, lease, token, ttl)
        self._held.add(lead)
        return lead

    def leader(self, name: str) -> str | None:
        check_election(name)
        kvs = self._gw.range(PREFIX + f"leaders/{name}")
        return _unb64(kvs[0]["value"]) if kvs else None

    # -- events -------------------------------------------------------------------------------

    def append_event(self, kind: str, node: str, data: Mapping[str, Any] | None = None) -> Event:
        check_kind(kind)
        check_node(node)
        body = dict(data or {})
        now = time.time()
        key = PREFIX + f"events/{time.time_ns():020d}-{node}-{os.urandom(4).hex()}"
        value = json.dumps({"time": now, "kind": kind, "node": node, "data": body})
        r = self._gw.txn([], [_put(key, value)])
        return Event(_rev(r), now, kind, node, body)

    def events_since(self, seq: int, limit: int = 1000) -> list[Event]:
        kvs = self._gw.range(
            PREFIX + "events/",
            prefix=True,
            min_mod_revision=seq + 1,
            sort_order="ASCEND",
            sort_target="MOD",
            limit=limit,
        )
        out = []
        for kv in kvs:
            e = json.loads(_unb64(kv["value"]))
            out.append(Event(int(kv["mod_revision"]), e["time"], e["kind"], e["node"], e["data"]))
        return out


# -- provisioning -----------------------------------------------------------------------------


def node_role(node: str) -> str:
    return f"jaula-node-{node}"


def _role_perms(node: str | None) -> Iterator[tuple[str, str, bool]]:
    """(permission, key, is_prefix) of a node's role (``node``) or the operators' (None)."""
    if node is None:
        yield "READWRITE", PREFIX, True
        return
    yield "READ", PREFIX, True
    yield "READWRITE", PREFIX + f"nodes/{node}", False
    yield "READWRITE", PREFIX + f"alive/{node}", False
    for p in _SHARED:
        yield "READWRITE", PREFIX + p, True


def provision(
    cfg: StateConfig,
    admin: str,
    admin_secret: bytes,
    nodes: Mapping[str, bytes],
    operators: Mapping[str, bytes],
) -> None:
    """Set etcd's users, roles and auth up for a cluster (idempotent).

    Creates user ``root`` (password derived from ``admin``'s CURVE secret key), one user and
    role per node (``nodes``: name -> CURVE secret key) and one user per operator with role
    ``jaula-operator`` (``operators``: name -> CURVE secret key), then enables auth.  Run it
    where the secret keys are (the directory ``jaula cluster init`` wrote), with ``admin``'s
    client certificate.  Once auth is on, it authenticates as root to add what is missing.

    Raises:
        StateUnavailable, StateAuthError, ClusterStateError: as :class:`Gateway`.
    """
    assert cfg.ca is not None
    root_pw = etcd_password(ROOT_USER, admin_secret)
    gw = Gateway(cfg.endpoints, cfg.ca, cfg.cert_for(admin), cfg.key_for(admin), cfg.timeout_s)
    try:
        try:
            gw.call("/auth/role/get", {"role": "root"})
            auth_on = False
        except StateAuthError:
            auth_on = True
        except ClusterStateError:
            auth_on = False  # role not found: auth is off (with auth on, root may read it)
        if auth_on:
            gw.close()
            gw = Gateway(
                cfg.endpoints,
                cfg.ca,
                cfg.cert_for(admin),
                cfg.key_for(admin),
                cfg.timeout_s,
                ROOT_USER,
                root_pw,
            )

        def ensure(path: str, body: Mapping[str, Any]) -> None:
            try:
                gw.call(path, body)
            except ClusterStateError as e:
                if "already exists" not in str(e) and "already granted" not in str(e):
                    raise

        ensure("/auth/user/add", {"name": ROOT_USER, "password": root_pw})
        ensure("/auth/user/grant", {"user": ROOT_USER, "role": "root"})
        roles: dict[str, str | None] = {OPERATOR_ROLE: None}
        roles.update({node_role(n): n for n in nodes})
        for role, node in roles.items():
            ensure("/auth/role/add", {"name": role})
            for perm, key, is_prefix in _role_perms(node):
                p: dict[str, Any] = {"permType": perm, "key": _b64(key)}
                if is_prefix:
                    p["range_end"] = _prefix_end(key)
                ensure("/auth/role/grant", {"name": role, "perm": p})
        for name, secret in [*nodes.items(), *operators.items()]:
            role = node_role(name) if name in nodes else OPERATOR_ROLE
            ensure("/auth/user/add", {"name": name, "password": etcd_password(name, secret)})
            ensure("/auth/user/grant", {"user": name, "role": role})
        if not auth_on:
            gw.call("/auth/enable", {})
    finally:
        gw.close()
