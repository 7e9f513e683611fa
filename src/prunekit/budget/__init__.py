"""Per-layer sparsity budgets: uniform, global by score, ERK, and latency-aware SPDY (measured
latency table, one-shot sensitivity database, DP, local search)."""

from prunekit.budget.alloc import erk, global_by_score, prune_with_budget, total_sparsity, uniform
from prunekit.budget.dp import Unreachable, solve
from prunekit.budget.latency_table import DEFAULT_LEVELS, LatencyTable, build_latency_table
from prunekit.budget.spdy import (
    Allocation,
    Database,
    Target,
    build_database,
    cost_matrix,
    for_speedup,
    layer_macs,
    spdy_search,
)

__all__ = [
    "erk", "global_by_score", "prune_with_budget", "total_sparsity", "uniform", "Unreachable",
    "solve", "DEFAULT_LEVELS", "LatencyTable", "build_latency_table", "Allocation", "Database",
    "Target", "build_database", "cost_matrix", "for_speedup", "layer_macs", "spdy_search",
]
