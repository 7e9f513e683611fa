"""One-shot (post-training) compression: the engine, calibration and the pruning methods.

`engine.run` is the loop every family uses; `prune` and `prune_layer` are the pruning verbs.
"""

from prunekit.oneshot.engine import (
    METHODS,
    LayerReport,
    LayerResult,
    Report,
    Transform,
    layer_levels,
    run,
    transform_layer,
)
from prunekit.oneshot.methods.base import PruneConfig, get_method, register
from prunekit.oneshot.methods.magnitude import Magnitude
from prunekit.oneshot.methods.obs import OBS
from prunekit.oneshot.methods.random import Random
from prunekit.oneshot.methods.sparsegpt import SparseGPT
from prunekit.oneshot.methods.wanda import Wanda
from prunekit.oneshot.methods.woodfisher import WoodFisher
from prunekit.oneshot.prune import prune, prune_layer, sparsity_report
from prunekit.oneshot.stream import prune_folder

__all__ = ["METHODS", "LayerReport", "LayerResult", "Report", "Transform", "layer_levels", "run",
           "transform_layer", "PruneConfig", "get_method", "register", "Magnitude", "OBS",
           "Random", "SparseGPT", "Wanda", "WoodFisher", "prune", "prune_layer",
           "sparsity_report", "prune_folder"]
