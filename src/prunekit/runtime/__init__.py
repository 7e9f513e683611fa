"""Sparse inference and export: kernels chosen per layer by measurement, latency measured as
a user would, and dense / compressed / ONNX export."""

from prunekit.runtime.convert import ConversionReport, LayerChoice, convert
from prunekit.runtime.export import (
    export_onnx,
    load_compressed,
    save_compressed,
    save_dense,
    verify_onnx,
)
from prunekit.runtime.kernels import (
    KERNELS,
    BlockWeight,
    CSRWeight,
    DenseWeight,
    SparseConv2d,
    SparseLinear,
    make_kernel,
    sparse_module,
)
from prunekit.runtime.latency import (
    eval_mode,
    keep_freed_memory,
    machine_info,
    measure_latency,
    num_threads,
    time_calls,
)

__all__ = [
    "ConversionReport", "LayerChoice", "convert", "export_onnx", "load_compressed",
    "save_compressed", "save_dense", "verify_onnx", "KERNELS", "BlockWeight", "CSRWeight",
    "DenseWeight", "SparseConv2d", "SparseLinear", "make_kernel", "sparse_module",
    "eval_mode", "keep_freed_memory",
    "machine_info", "measure_latency", "num_threads", "time_calls",
]
