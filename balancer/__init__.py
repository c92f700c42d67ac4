"""jaula's load balancer: a pure policy over a snapshot of the cluster, and the daemon.

``plan(view, cfg, history, now_s)`` (:mod:`balancer.policy`) decides which containers to
move; :mod:`balancer.cluster` is what it reads, :mod:`balancer.config` its settings,
:mod:`balancer.history` what it remembers and :mod:`balancer.costmodel` what a move costs.
:class:`Balancer` (:mod:`balancer.daemon`) polls the node services' metrics, runs the policy
while it leads, and requests the moves; :mod:`balancer.cli` is ``jaula balancer``.
"""

from balancer.cluster import BALANCE_LABEL, ClusterView, ContainerView, Layer, NodeView
from balancer.config import BalancerConfig
from balancer.costmodel import CostModel, MigrationSample, PredictedCost
from balancer.daemon import Balancer
from balancer.errors import BalancerConfigError, BalancerError, ClusterViewError
from balancer.history import MoveHistory, MoveRecord, RoundRecord
from balancer.policy import Decision, PlannedMove, Reason, imbalance, node_load, plan

__all__ = [
    "BALANCE_LABEL",
    "Balancer",
    "BalancerConfig",
    "BalancerConfigError",
    "BalancerError",
    "ClusterView",
    "ClusterViewError",
    "ContainerView",
    "CostModel",
    "Decision",
    "Layer",
    "MigrationSample",
    "MoveHistory",
    "MoveRecord",
    "NodeView",
    "PlannedMove",
    "PredictedCost",
    "Reason",
    "RoundRecord",
    "imbalance",
    "node_load",
    "plan",
]
