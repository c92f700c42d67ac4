"""The balancer's exceptions: one base, :class:`BalancerError` (STYLE.md habit 4)."""

from __future__ import annotations


class BalancerError(Exception):
    """Base of every error the balancer raises."""


class BalancerConfigError(BalancerError):
    """A balancer configuration is unusable.  The message is one line naming the file (when
    there is one), the key, what is wrong and what to write instead.

    Attributes:
        path: the TOML file, or "" for a mapping given in code.
        key: the dotted key at fault, or "" for the file as a whole.
    """

    def __init__(self, message: str, *, path: str = "", key: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.key = key


class ClusterViewError(BalancerError):
    """A :class:`~balancer.cluster.ClusterView` is inconsistent (a container on a node the
    view does not list, two nodes with one name, a negative figure); the message names it."""
