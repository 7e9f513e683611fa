"""Per-layer sparsity budgets: uniform, global by score, ERK, OWL, and latency-aware SPDY (measured
latency table, one-shot sensitivity database, DP, local search), and a loop that turns a
predicted speedup into a measured one."""

from prunekit.budget.alloc import (
    BUDGETS,
    erk,
    erk_densities,
    global_by_score,
    global_keep_masks,
    threshold_counts,
    total_sparsity,
    uniform,
)
from prunekit.budget.dp import Unreachable, solve
from prunekit.budget.latency_table import DEFAULT_LEVELS, LatencyTable, build_latency_table
from prunekit.budget.measured import (
    MeasuredSpeedup,
    SpeedupResult,
    converted_speedup,
    meet_measured_speedup,
    prune_for_speedup,
    unfit_layers,
)
from prunekit.budget.owl import outlier_ratios, owl
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
    "BUDGETS", "erk", "erk_densities", "global_by_score", "global_keep_masks",
    "threshold_counts", "total_sparsity", "uniform", "Unreachable",
    "solve", "DEFAULT_LEVELS", "LatencyTable", "build_latency_table", "Allocation", "Database",
    "Target", "build_database", "cost_matrix", "for_speedup", "layer_macs", "spdy_search",
    "MeasuredSpeedup", "SpeedupResult", "converted_speedup", "meet_measured_speedup",
    "prune_for_speedup", "unfit_layers", "outlier_ratios", "owl",
]
