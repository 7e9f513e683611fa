"""Structured pruning that physically shrinks models: a channel dependency graph traced from
the model, importance criteria per coupled group, budgets in channels, FLOPs, parameters or
latency, and removal that yields a plain smaller nn.Module (saved and loaded with its new
shapes)."""

from prunekit.structured.api import (
    ChannelPrune,
    ShrinkReport,
    count_flops,
    count_params,
    load_shrunk,
    measure_latency,
    read_description,
    save_shrunk,
    shrink,
)
from prunekit.structured.graph import ChannelClass, ChannelGroup, DependencyGraph, build_graph
from prunekit.structured.importance import CRITERIA, score, taylor_scores
from prunekit.structured.remove import remove_slices

__all__ = [
    "ChannelPrune", "ShrinkReport", "count_flops", "count_params", "load_shrunk",
    "measure_latency", "read_description", "save_shrunk", "shrink", "ChannelClass",
    "ChannelGroup", "DependencyGraph", "build_graph", "CRITERIA", "score", "taylor_scores",
    "remove_slices",
]
