"""The runtime's IP leases (:class:`runtime.network.IpLeases`) over the cluster state.

A node service gives its :class:`runtime.Runtime` ``leases=ClusterLeases(state)``: every
``--network bridge`` container of the cluster then takes its address from the cluster
state's ``lease_ip`` (files on one host, etcd in a real cluster), atomically, so two nodes
starting containers at the same moment never get one address.  The runtime imports nothing
from migrate; this adapter translates the store's errors into the runtime's.
"""

from __future__ import annotations

from migrate.cluster_state import ClusterState, ClusterStateError
from migrate.cluster_state import NoAddressFree as StoreNoAddressFree
from runtime.network import NetworkError, NoAddressFree


class ClusterLeases:
    """:class:`runtime.network.IpLeases` backed by a :class:`ClusterState`."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state

    def lease_ip(self, subnet: str, container_id: str, address: str | None = None) -> str:
        """See :meth:`runtime.network.IpLeases.lease_ip`; the store's NoAddressFree becomes
        the runtime's, a bad subnet or address NetworkError, an unreachable store
        NetworkError naming it."""
        try:
            return self.state.lease_ip(subnet, container_id, address).address
        except StoreNoAddressFree as e:
            raise NoAddressFree(str(e)) from e
        except ValueError as e:
            raise NetworkError(f"cannot lease {address or 'an address'} in {subnet}: {e}") from e
        except ClusterStateError as e:
            raise NetworkError(f"cannot lease an address in {subnet}: {e}") from e

    def release_ip(self, subnet: str, container_id: str) -> bool:
        """See :meth:`runtime.network.IpLeases.release_ip`."""
        try:
            return self.state.release_ip(subnet, container_id)
        except ClusterStateError as e:
            raise NetworkError(f"cannot release the address of {container_id[:12]}: {e}") from e
