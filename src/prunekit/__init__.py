"""prunekit: make neural networks smaller and faster by pruning, and measure what it buys."""

from prunekit.errors import PruneError
from prunekit.lowrank import ALDS, SVD, lowrank
from prunekit.oneshot import (
    METHODS,
    OBS,
    LayerReport,
    Magnitude,
    PruneConfig,
    Random,
    Report,
    SparseGPT,
    Wanda,
    WoodFisher,
    prune,
    prune_layer,
    sparsity_report,
)
from prunekit.patterns import NM, Block1xN, Pattern, Unstructured, get_pattern
from prunekit.structured import ChannelPrune, ShrinkReport, shrink

__version__ = "0.1.0"

# imported on first use, so that `import prunekit` stays light and `prunekit.train.RigL`
# works without importing prunekit.train first
_SUBPACKAGES = ("bench", "budget", "data", "evaluate", "models", "runtime", "train")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"prunekit.{name}")
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")

PruneReport = Report  # the name before the engine's reports covered every family

__all__ = [
    "METHODS", "Report", "LayerReport", "PruneReport", "prune", "prune_layer",
    "sparsity_report", "PruneError",
    "OBS", "Magnitude", "PruneConfig", "Random", "SparseGPT", "Wanda", "WoodFisher", "NM",
    "Block1xN",
    "Pattern", "Unstructured", "get_pattern", "ChannelPrune", "ShrinkReport", "shrink",
    "ALDS", "SVD", "lowrank",
]
