"""Structured pruning that physically shrinks models: a channel dependency graph traced from
the model, importance criteria per coupled group, budgets in channels, FLOPs, parameters or
latency, and removal that yields a plain smaller nn.Module (saved and loaded with its new
shapes).

Modules, in import order (none imports a later one): graph (the graph's types), measure
(params, FLOPs, latency, modes), remove (cutting slices out), tracer (build_graph), paths
(data-dependent control flow), verify (verify_graph), importance (CRITERIA), config
(ChannelPrune), plan (budgets to classes), api (shrink, save / load). For Llama-architecture
causal LMs: llm (key/value-group-aware heads, MLP neurons, hidden width and whole blocks, saved
as transformers folders) and distill (recovery from the dense model).
"""

from prunekit.structured.api import (
    ShrinkReport,
    load_shrunk,
    read_description,
    save_shrunk,
    shrink,
)
from prunekit.structured.config import ChannelPrune
from prunekit.structured.distill import distill
from prunekit.structured.graph import ChannelClass, ChannelGroup, DependencyGraph
from prunekit.structured.importance import CRITERIA, score, taylor_scores
from prunekit.structured.llm import LLMShrink, load_llm, save_llm, shrink_llm
from prunekit.structured.measure import count_flops, count_params, measure_latency
from prunekit.structured.remove import remove_slices
from prunekit.structured.tracer import build_graph
from prunekit.structured.verify import verify_graph

__all__ = [
    "ChannelPrune", "ShrinkReport", "count_flops", "count_params", "load_shrunk",
    "measure_latency", "read_description", "save_shrunk", "shrink", "ChannelClass",
    "ChannelGroup", "DependencyGraph", "build_graph", "verify_graph", "CRITERIA", "score",
    "taylor_scores", "remove_slices", "LLMShrink", "shrink_llm", "save_llm", "load_llm",
    "distill",
]
