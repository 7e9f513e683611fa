"""`prunekit quantize`: post-training quantization of a registry model."""

from __future__ import annotations

import sys

from prunekit.commands import COMMANDS
from prunekit.commands.common import add_threads_option, print_result, with_threads
from prunekit.errors import PruneError


@COMMANDS.register("quantize")
def register(sub) -> None:
    from prunekit.oneshot import METHODS

    p = sub.add_parser("quantize", help="quantize a model's weights one-shot (RTN, GPTQ, OBQ) "
                                        "and save them with their quantized form")
    p.add_argument("model", help="registry name (see `prunekit models`), a .gguf file, a "
                                 "transformers causal-LM folder, or module:function")
    p.add_argument("--method", default="gptq",
                   help="one of: " + ", ".join(METHODS.where(family="quantize")))
    p.add_argument("--bits", type=int, default=4, help="bits per weight, 2..8 (default 4)")
    p.add_argument("--group-size", type=int, default=None,
                   help="inputs per scale (e.g. 128); default: one scale per output channel")
    p.add_argument("--asym", action="store_true", help="asymmetric grid (zero points)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="any other method option, e.g. -o act_order=true -o search=mse "
                        "-o exclude=classifier")
    p.add_argument("--weights", help="safetensors weights to load before quantizing")
    p.add_argument("--pretrained", action="store_true", help="load the registry's weights")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept a pickle checkpoint for --weights (runs code: trusted files only)")
    p.add_argument("--calib-samples", type=int, default=None,
                   help="calibration samples (default 128; causal LMs: 32 segments)")
    p.add_argument("--calib-tokens", type=int, default=None,
                   help="tokens per calibration segment of a causal LM (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw")
    p.add_argument("--out", help="where to write the quantized model (see --format)")
    p.add_argument("--format", default="dir",
                   choices=("dir", "prunekit", "compressed-tensors", "gguf-q8_0", "gguf-q4_0"),
                   help="dir (default): a folder with model.safetensors (dequantized) and "
                        "quantized.safetensors (codes, scales, zero points); prunekit: one "
                        "packed file, exact for every grid and keep-mask; compressed-tensors: "
                        "a transformers folder in the pack-quantized format (vLLM and "
                        "transformers load it); gguf-q8_0 / gguf-q4_0: a llama.cpp file "
                        "(Llama models; needs symmetric float16 scales in groups of 32: "
                        "--group-size 32 -o scale_dtype=float16)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_threads_option(p)
    p.set_defaults(func=with_threads(cmd_quantize))


def make_config(method: str, bits: int, group_size: int | None, asym: bool, options=()):
    """A quantizer config from command-line text; unknown options name the valid ones."""
    from prunekit.config import build, field_names
    from prunekit.oneshot import METHODS
    from prunekit.quant import QuantConfig

    cls = METHODS.get(method)
    if not (isinstance(cls, type) and issubclass(cls, QuantConfig)):
        raise PruneError(f"{method} is not a quantization method; use one of "
                         f"{', '.join(METHODS.where(family='quantize'))} (to prune and "
                         f"quantize in one pass: prunekit prune MODEL --method sparsegpt "
                         f"-o quant=int4:g128)")
    values: dict = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            raise PruneError(f"option {item!r} is not KEY=VALUE; options of {method} are: "
                             f"{', '.join(field_names(cls))}")
        values[key.strip()] = value.strip()
    values.update(bits=bits, group_size=group_size)
    if asym:
        values["sym"] = False
    return build(cls, values, text=True, where=method)


def cmd_quantize(args) -> int:
    from prunekit.models import calibration_batches, get_info, load_model
    from prunekit.models.llm import is_model_path
    from prunekit.quant import quantize, save_quantized

    custom = ":" in args.model and not is_model_path(args.model)
    info = None if custom else get_info(args.model)
    causal = info is not None and info.task == "causal-lm"
    options = list(args.option)
    if causal:  # as `prunekit prune`: the tied head stays float, LLMs calibrate block by block
        given = {o.partition("=")[0].strip() for o in options}
        options = [d for d in ("exclude=lm_head", "sequential=true")
                   if d.partition("=")[0] not in given] + options
    config = make_config(args.method, args.bits, args.group_size, args.asym, options)
    if args.format in ("compressed-tensors", "gguf-q8_0", "gguf-q4_0") and not causal:
        raise PruneError(f"--format {args.format} writes a transformers causal LM; "
                         f"{args.model} is not one (use --format dir or prunekit)")
    if args.format != "dir" and not args.out:
        raise PruneError(f"--format {args.format} needs --out")
    model = load_model(args.model, weights=args.weights,
                       pretrained=args.pretrained or (causal and info.pretrained_available),
                       allow_pickle=args.allow_pickle)
    if args.format != "dir":  # the other formats hold matrices: refuse before the work
        from prunekit.layers import find_layers

        for name, m in find_layers(model, config.include, config.exclude).items():
            if m.weight.dim() != 2:
                raise PruneError(f"{name}: --format {args.format} holds linear layers only; "
                                 f"leave it float with -o exclude={name} or use --format dir")
    options = {}
    if args.format.startswith("gguf") and not hasattr(getattr(model, "tokenizer", None),
                                                      "backend_tokenizer"):
        options["tokenizer"] = False  # a weights-only file: the model has no BPE tokenizer
        print(f"prunekit: note: {args.model} has no fast tokenizer; the GGUF holds the weights "
              f"only", file=sys.stderr)
    calib = None
    if config.needs != "none" or config.sequential:
        if custom:
            raise PruneError(f"{config.method} needs calibration data, which prunekit can draw "
                             f"only for registry models; use the Python API for {args.model}")
        calib = calibration_batches(info, n=args.calib_samples, seed=args.seed,
                                    seq_len=args.calib_tokens,
                                    tokenizer=getattr(model, "tokenizer", None))
    report = quantize(model, config, calib, progress=not args.quiet)
    result = report.to_dict()
    if args.out and args.format == "dir":
        save_quantized(model, args.out, metadata={"prunekit_report": result})
    elif args.out:
        from prunekit.quant.formats import export

        result["export"] = export(model, args.out, args.format, **options)
    print_result(args, result, str(report))
    return 0
