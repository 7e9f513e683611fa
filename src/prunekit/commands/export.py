"""`prunekit export MODEL --format dense|compressed|onnx --out PATH`."""

from __future__ import annotations

import json
import sys

from prunekit.commands import COMMANDS
from prunekit.errors import PruneError


@COMMANDS.register("export")
def register(sub) -> None:
    p = sub.add_parser("export", help="write a (pruned) model as dense or compressed "
                                      "safetensors, or ONNX verified with onnxruntime")
    p.add_argument("model", help="registry name (see `prunekit models`) or module:function")
    p.add_argument("--weights", help="safetensors weights to load first (e.g. a pruned model)")
    p.add_argument("--pretrained", action="store_true", help="load the registry's weights")
    p.add_argument("--format", choices=("dense", "compressed", "onnx"), default="compressed")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--batch-size", type=int, default=2, help="ONNX: sample batch size")
    p.add_argument("--no-verify", action="store_true", help="ONNX: skip the onnxruntime check")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from prunekit.models import load_model
    from prunekit.runtime import export_onnx, save_compressed, save_dense

    if args.format == "onnx" and args.batch_size < 1:
        raise PruneError(f"--batch-size must be >= 1, got {args.batch_size}")
    model = load_model(args.model, weights=args.weights, pretrained=args.pretrained)
    if args.format == "dense":
        result = save_dense(model, args.out)
    elif args.format == "compressed":
        result = save_compressed(model, args.out)
    else:
        from prunekit.commands.latency import sample_batch

        batch = sample_batch(args.model, args.batch_size)
        if isinstance(batch, dict):
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        result = export_onnx(model, batch, args.out, verify=not args.no_verify)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    print(f"wrote {result['path']} ({result['bytes']:,} bytes)")
    if "ratio" in result:
        print(f"dense tensors {result['dense_bytes']:,} bytes; compressed {result['ratio']:.2f}x "
              f"smaller ({len(result['compressed'])} tensors as bitmask + values)")
    if result.get("max_abs_diff") is not None:
        print(f"onnxruntime matches PyTorch: max |difference| {result['max_abs_diff']:.3g}")
    return 0
