"""Quantized models in the files other tools load, and in prunekit's own exact format.

Each writer reads the layers' quantized forms (`module.quantized_weight`, checked against the
weights first) and writes atomically (prunekit.io.atomic_write); nothing is re-rounded
unless the caller asks for it, and a layer a format cannot hold exactly is refused by name.

- "compressed-tensors": a transformers folder in compressed-tensors' pack-quantized format
  (the format llm-compressor writes and vLLM and transformers read): per quantized layer
  `weight_packed` (the codes as a dense little-endian bit stream of `bits` bits each, in
  int32 words, per output row), `weight_scale` (out, groups) float32, `weight_shape`, and for
  an asymmetric grid `weight_zero_point` packed the same way along the output dimension; the
  config's quantization_config holds one group per grid (targets: the layer names). Its
  dequantization, (c - 2^(b-1) - (z - 2^(b-1))) * s, is prunekit's (c - z) * s to the bit.
- "gguf-q8_0", "gguf-q4_0": a llama.cpp GGUF of a Llama-architecture model. Q4_0 is a block
  of 32 inputs with one float16 scale d and codes q in 0..15 standing for (q - 8) * d: a
  symmetric 4-bit grid in groups of 32 with float16 scales (GPTQ(bits=4, group_size=32,
  scale_dtype="float16")) is exactly that (d = s, q = c); Q8_0 likewise for 8 bits, the int8
  value c - 128. Those layers are written as they are; a layer on another grid is refused;
  a float layer is rounded with gguf's own Q8_0/Q4_0 quantizer only with
  round_float=True (and reported). Norms and embeddings stay float32. The query and key rows
  are put back in llama.cpp's order; the tokenizer (byte-level BPE) goes in as gguf keys.
- "prunekit": one safetensors file, exact for every grid and for joint sparse + quantized
  layers: per layer the keep-mask as packed bits (`__bitmask__`), the codes of the kept
  weights only as a dense bit stream (`__codes__`), scales, zero points (`__zeros__`,
  asymmetric grids) and the grid and shape in the metadata; every other tensor as it is.
  `load_packed` rebuilds the same QuantizedWeight (mask included) and the same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prunekit.errors import PruneError
from prunekit.io import atomic_write
from prunekit.quant.grid import Grid, QuantizedWeight, get_grid
from prunekit.quant.model import attach, check_matches, quantized_layers

FORMATS = ("safetensors", "prunekit", "compressed-tensors", "gguf-q8_0", "gguf-q4_0")
PACKED_FORMAT = "prunekit-quant-v1"


# -- bit streams ------------------------------------------------------------------------------

def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) uint8 codes < 2^bits as int32 words (rows, ceil(n * bits / 32)): code i of a
    row at bits [i * bits, (i + 1) * bits) of the row's little-endian bit stream
    (compressed-tensors' pack_to_int32 of the signed values c - 2^(bits-1))."""
    c = codes.detach().cpu().contiguous().numpy().astype(np.uint8)
    rows, n = c.shape
    b = np.unpackbits(c[..., None], axis=-1, bitorder="little")[..., :bits]
    b = b.reshape(rows, n * bits)
    words = -(-n * bits // 32)
    b = np.pad(b, ((0, 0), (0, words * 32 - n * bits)))
    packed = np.packbits(b, axis=-1, bitorder="little").view("<i4")
    return torch.from_numpy(packed.astype(np.int32).reshape(rows, words))


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """pack_codes undone: (rows, n) uint8."""
    p = packed.detach().cpu().contiguous().numpy().astype("<i4")
    rows = p.shape[0]
    b = np.unpackbits(p.view(np.uint8).reshape(rows, -1), axis=-1, bitorder="little")
    b = b[:, :n * bits].reshape(rows, n, bits)
    return torch.from_numpy(np.packbits(b, axis=-1, bitorder="little")[..., 0].copy())


# -- shared ----------------------------------------------------------------------------------

def checked_forms(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Every quantized layer's form, checked against the layer's weight."""
    forms = quantized_layers(model)
    if not forms:
        raise PruneError(f"{type(model).__name__} has no quantized layer; quantize it first "
                         f"(prunekit.quantize, or prunekit quantize MODEL --out DIR)")
    modules = dict(model.named_modules())
    for name, q in forms.items():
        q.check(name)
        check_matches(name, modules[name], q)
        if modules[name].weight.dim() != 2:
            raise PruneError(f"{name}: only linear layers can be exported in a quantized "
                             f"format (a convolution's weight is not one matrix on disk)")
    return forms


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict, tied tensors once (under their first name), contiguous, on the CPU."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), tuple(v.shape), v.stride()) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[k] = v.detach().cpu().contiguous()
    return out


def _write_folder(out: Path, fill) -> Path:
    """Write a folder whole or not at all: fill(tmp_dir), then rename into place."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PruneError(f"{out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fill(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- compressed-tensors ----------------------------------------------------------------------

def _ct_weights(grid: Grid, cols: int) -> dict:
    channel = grid.group(cols) == cols and grid.group_size is None
    return {"num_bits": grid.bits, "type": "int", "symmetric": grid.sym,
            "strategy": "channel" if channel else "group",
            "group_size": None if channel else grid.group_size, "dynamic": False,
            "actorder": None, "observer": "minmax", "block_structure": None,
            "observer_kwargs": {}}


def save_compressed_tensors(model: nn.Module, out: str | os.PathLike) -> dict:
    """Write a transformers folder in compressed-tensors' pack-quantized format (module
    docstring). The model must be a transformers model (it has `config`); its tokenizer
    (`model.tokenizer`) is saved beside when present. Returns {"path", "bytes", "layers"}."""
    from safetensors.torch import save_file

    forms = checked_forms(model)
    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise PruneError(f"compressed-tensors export needs a transformers model (with a "
                         f"config); {type(model).__name__} has none: use format 'prunekit'")
    tensors = _state(model)
    groups: dict[str, dict] = {}
    for name, q in forms.items():
        out_f, cols = q.shape
        if f"{name}.weight" not in tensors:
            raise PruneError(f"{name}: its weight is tied to another tensor saved under "
                             f"another name; exclude it from quantization")
        del tensors[f"{name}.weight"]
        tensors[f"{name}.weight_packed"] = pack_codes(q.codes, q.grid.bits)
        tensors[f"{name}.weight_scale"] = q.scales.float().contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor([out_f, cols], dtype=torch.int64)
        if not q.grid.sym:
            tensors[f"{name}.weight_zero_point"] = pack_codes(q.zeros.t(), q.grid.bits).t() \
                .contiguous()
        key = json.dumps(_ct_weights(q.grid, cols), sort_keys=True)
        groups.setdefault(key, {"targets": [], "weights": json.loads(key)})["targets"] \
            .append(name)
    try:
        from importlib.metadata import version
        ct_version = version("compressed-tensors")
    except Exception:
        ct_version = "0.20.0"
    qconfig = {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "quantization_status": "compressed", "global_compression_ratio": None,
        "ignore": [], "kv_cache_scheme": None, "sparsity_config": {},
        "config_groups": {f"group_{i}": {"targets": g["targets"], "weights": g["weights"],
                                         "input_activations": None,
                                         "output_activations": None,
                                         "format": "pack-quantized"}
                          for i, g in enumerate(groups.values())},
        "version": ct_version}

    def fill(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = qconfig
        cfg["torch_dtype"] = cfg["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok = getattr(model, "tokenizer", None)
        if hasattr(tok, "save_pretrained"):  # a transformers tokenizer
            tok.save_pretrained(tmp)

    path = _write_folder(Path(out), fill)
    return {"path": str(path), "bytes": _size(path / "model.safetensors"),
            "layers": len(forms)}


# -- GGUF ------------------------------------------------------------------------------------

#: transformers name (per block) -> llama.cpp name, the inverse of models.llm's table
def _gguf_name(name: str) -> str:
    from prunekit.models.llm import _BLOCK_NAMES, _TOP_NAMES

    base, _, suffix = name.rpartition(".")
    for gg, hf in _TOP_NAMES.items():
        if base == hf:
            return f"{gg}.{suffix}"
    parts = base.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) >= 4:
        rest = ".".join(parts[3:])
        for gg, hf in _BLOCK_NAMES.items():
            if rest == hf:
                return f"blk.{int(parts[2])}.{gg}.{suffix}"
    raise PruneError(f"tensor {name} has no place in a llama.cpp GGUF (a Llama model's "
                     f"embeddings, norms, attention and MLP projections, lm_head)")


def permute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a query/key weight (or of anything row-aligned with it) in llama.cpp's order:
    models.llm.unpermute_rope undone."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(heads, 2, rows // heads // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def gguf_blocks(q: QuantizedWeight, qtype: str, layer: str = "layer") -> np.ndarray:
    """The layer's codes as GGUF Q8_0 / Q4_0 blocks, bytes (out, in // 32 * block bytes);
    refuses (naming the layer and the grid to use) a grid that is not the type's own."""
    bits = {"q8_0": 8, "q4_0": 4}[qtype]
    g = q.grid
    if not (g.bits == bits and g.sym and g.group_size == 32 and g.scale_dtype == "float16"):
        raise PruneError(
            f"{layer}: its grid {g.spec} is not GGUF {qtype.upper()}'s (symmetric {bits}-bit "
            f"groups of 32 with float16 scales, int{bits}:g32:fp16); quantize with "
            f"bits={bits}, group_size=32, sym=True, scale_dtype='float16', or export "
            f"another format")
    out, cols = q.shape
    d = q.scales.numpy().astype(np.float16)  # exact: the scales are float16 values
    if not np.array_equal(d.astype(np.float32), q.scales.numpy()):
        raise PruneError(f"{layer}: scales are not exact float16 values")
    d = d.reshape(out, cols // 32, 1).view(np.uint8)  # (out, blocks, 2)
    c = q.codes.numpy().reshape(out, cols // 32, 32)
    if bits == 8:
        qs = (c.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    else:
        qs = c[..., :16] | (c[..., 16:] << 4)
    return np.concatenate([d, qs], axis=2).reshape(out, -1)


def _tokenizer_fields(writer, model) -> None:
    """The tokenizer as gguf keys: byte-level BPE (gpt2-style) only."""
    tok = getattr(model, "tokenizer", None)
    if tok is None or not hasattr(tok, "backend_tokenizer"):
        raise PruneError("GGUF export needs the model's fast tokenizer as model.tokenizer")
    spec = json.loads(tok.backend_tokenizer.to_str())
    bpe = spec.get("model", {})
    if bpe.get("type") != "BPE":
        raise PruneError(f"GGUF export writes byte-level BPE tokenizers only, this one is "
                         f"{bpe.get('type')!r}")
    vocab = dict(bpe["vocab"])
    special = {}
    for t in spec.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        special[t["id"]] = bool(t.get("special"))
    size = max(model.config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # unused
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (3 if special[i] else 4) if i in special else 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    name = str(getattr(tok, "name_or_path", "")).lower()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if "smollm" in name else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    cfg = model.config
    for key, add in (("bos_token_id", writer.add_bos_token_id),
                     ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            add(value)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def save_gguf(model: nn.Module, path: str | os.PathLike, qtype: str = "q4_0",
              round_float: bool = False, tokenizer: bool = True) -> dict:
    """Write a llama.cpp GGUF of a transformers LlamaForCausalLM whose quantized layers lie on
    the type's grid (module docstring). round_float=True rounds the float linear layers
    (not lm_head or the embeddings) with gguf's own quantizer. tokenizer=False leaves the
    tokenizer keys out (a weights-only file, for models without a BPE tokenizer). Returns
    {"path", "bytes", "exact": [layers written from their codes],
    "rounded": [layers rounded here]}."""
    import gguf

    qtype = qtype.lower()
    if qtype not in ("q8_0", "q4_0"):
        raise PruneError(f"GGUF type {qtype!r} is not written by prunekit; use q8_0 or q4_0")
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama":
        raise PruneError(f"GGUF export takes a Llama-architecture transformers model "
                         f"(model_type 'llama'), got {getattr(cfg, 'model_type', None)!r}")
    forms = quantized_layers(model)
    if forms:
        forms = checked_forms(model)
    gtype = getattr(gguf.GGMLQuantizationType, qtype.upper())
    modules = dict(model.named_modules())
    state = _state(model)
    blocks: dict[str, tuple[np.ndarray, tuple]] = {}
    exact, rounded = [], []
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    for name, t in state.items():  # check and encode everything before writing
        gname = _gguf_name(name)
        layer = name.rpartition(".")[0]
        perm = heads if gname.endswith("attn_q.weight") else \
            kv if gname.endswith("attn_k.weight") else None
        if layer in forms:
            data = gguf_blocks(forms[layer], qtype, layer)
            exact.append(layer)
        elif (round_float and t.dim() == 2 and isinstance(modules.get(layer), nn.Linear)
              and layer != "lm_head"):
            if t.shape[1] % 32:
                raise PruneError(f"{layer}: {t.shape[1]} inputs is not a multiple of 32")
            data = gguf.quants.quantize(t.float().numpy(), gtype)
            rounded.append(layer)
        else:
            data = None
        if data is None:
            arr = t.float().numpy()
            if perm:
                arr = permute_rope(arr, perm)
            blocks[gname] = (np.ascontiguousarray(arr), None)
        else:
            if perm:
                data = permute_rope(data, perm)
            blocks[gname] = (np.ascontiguousarray(data), tuple(t.shape))
    if not exact and not rounded:
        raise PruneError(f"no layer of {type(model).__name__} is on the {qtype.upper()} grid; "
                         f"quantize with bits={8 if qtype == 'q8_0' else 4}, group_size=32, "
                         f"scale_dtype='float16' (or pass round_float=True)")

    def write(tmp):
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(str(getattr(cfg, "_name_or_path", "") or "prunekit-export"))
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_rope_dimension_count(cfg.hidden_size // heads)
        w.add_head_count(heads)
        w.add_head_count_kv(kv)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        theta = getattr(cfg, "rope_theta", None) or \
            (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        w.add_rope_freq_base(float(theta))
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "q8_0"
                        else gguf.LlamaFileType.MOSTLY_Q4_0)
        if tokenizer:
            _tokenizer_fields(w, model)
        for gname, (arr, shape) in blocks.items():
            if shape is None:
                w.add_tensor(gname, arr)
            else:
                w.add_tensor(gname, arr, raw_dtype=gtype)  # uint8 blocks: shape from bytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    out = atomic_write(path, write)
    return {"path": str(out), "bytes": out.stat().st_size, "exact": exact,
            "rounded": rounded}


def read_gguf(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF dequantized by the gguf package's reader, float32, by gguf
    name, in numpy (rows, cols) order (no row reordering)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        out[t.name] = w.reshape(tuple(int(s) for s in reversed(t.shape)))
    return out


# -- prunekit's own packed format ------------------------------------------------------------

def save_packed(model: nn.Module, path: str | os.PathLike) -> dict:
    """One safetensors file with every quantized layer packed (module docstring) and every
    other tensor as it is; exact for any grid, the keep-masks of joint layers included.
    Returns {"path", "bytes", "layers"}. Signed with the sha256 of its tensors and metadata
    (prunekit.io.write_safetensors), which read_packed checks."""
    from prunekit.io import write_safetensors

    forms = checked_forms(model)
    tensors = _state(model)
    meta = {"__format__": PACKED_FORMAT}
    for name, q in forms.items():
        tensors.pop(f"{name}.weight", None)
        base = f"{name}.weight"
        codes = q.codes if q.keep is None else q.codes[q.keep]  # pruned: the mask says
        tensors[base + ".__codes__"] = pack_codes(codes.reshape(1, -1), q.grid.bits)
        tensors[base + ".__scales__"] = q.scales.float().contiguous()
        if not q.grid.sym:
            tensors[base + ".__zeros__"] = pack_codes(q.zeros.reshape(1, -1), q.grid.bits)
        if q.keep is not None:
            tensors[base + ".__bitmask__"] = torch.from_numpy(
                np.packbits(q.keep.numpy().reshape(-1)))
        meta[base] = json.dumps({"grid": q.grid.spec, "shape": list(q.shape),
                                 "keep": q.keep is not None})
    out = write_safetensors(tensors, path, meta)
    return {"path": str(out), "bytes": out.stat().st_size, "layers": len(forms)}


def read_packed(path: str | os.PathLike) -> tuple[dict, dict[str, QuantizedWeight]]:
    """(the float tensors by name, {layer: QuantizedWeight}) from a save_packed file; the
    quantized layers' weights are their dequantized forms, under '<layer>.weight'. A file
    whose tensors or metadata do not match the checksums it was written with is a
    PruneError."""
    from prunekit.io import CHECKSUM_KEY, META_CHECKSUM_KEY, read_safetensors

    path = Path(path)
    if not path.exists():
        raise PruneError(f"packed quantized file {path} does not exist")
    raw, meta = read_safetensors(path)
    if meta.get("__format__") != PACKED_FORMAT:
        raise PruneError(f"{path} is not a prunekit packed quantized file "
                         f"({PACKED_FORMAT}); read it with prunekit.io.read_weights")
    if CHECKSUM_KEY not in meta or META_CHECKSUM_KEY not in meta:
        raise PruneError(f"{path} is corrupt or was written by an older prunekit: its header "
                         f"lacks the checksums save_packed writes; export it again")
    state = {k: v for k, v in raw.items() if ".__" not in k}
    forms = {}
    for base, info in meta.items():
        if base in ("__format__", CHECKSUM_KEY, META_CHECKSUM_KEY):
            continue
        try:
            info = json.loads(info)
            grid = get_grid(info["grid"])
            out_f, cols = (int(x) for x in info["shape"])
            if not base.endswith(".weight") or base + ".__codes__" not in raw:
                raise ValueError(base)
        except (ValueError, TypeError, KeyError, PruneError) as e:
            raise PruneError(f"{path} is corrupt: header entry {base!r} is not a quantized "
                             f"layer ({e})") from None
        layer = base[:-len(".weight")]
        groups = cols // grid.group(cols)
        try:
            scales = raw[base + ".__scales__"]
            zeros = (unpack_codes(raw[base + ".__zeros__"], grid.bits, out_f * groups)
                     .reshape(out_f, groups) if not grid.sym else
                     torch.full((out_f, groups), (grid.maxq + 1) // 2, dtype=torch.uint8))
            keep = None
            if info["keep"]:
                keep = torch.from_numpy(np.unpackbits(raw[base + ".__bitmask__"].numpy(),
                                                      count=out_f * cols).astype(bool))
                keep = keep.reshape(out_f, cols)
                kept = unpack_codes(raw[base + ".__codes__"], grid.bits, int(keep.sum()))
                codes = grid.expand(zeros, cols).clone()
                codes[keep] = kept.reshape(-1)
            else:
                codes = unpack_codes(raw[base + ".__codes__"], grid.bits, out_f * cols)
                codes = codes.reshape(out_f, cols)
        except KeyError as e:
            raise PruneError(f"{path}: layer {layer} lacks its tensor {e}") from None
        q = QuantizedWeight.from_tensors(grid, {"codes": codes, "scales": scales,
                                                "zeros": zeros, "keep": keep}, layer)
        forms[layer] = q
        state[base] = q.dequantize()
    return state, forms


def load_packed(model: nn.Module, path: str | os.PathLike) -> dict[str, QuantizedWeight]:
    """Load a save_packed file into `model` (same architecture): every tensor, checked by
    name and shape, then each layer's quantized form, attached. Returns the forms."""
    from prunekit.io import load_weights
    from prunekit.layers import set_weight_matrix

    state, forms = read_packed(path)
    modules = dict(model.named_modules())
    missing = [n for n in forms if n not in modules]
    if missing:
        raise PruneError(f"{path}: layer {missing[0]} is not in {type(model).__name__}")
    with tempfile.TemporaryDirectory() as tmp:  # load_weights checks every tensor by name
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, f"{tmp}/w.safetensors")
        load_weights(model, f"{tmp}/w.safetensors")
    for name, q in forms.items():
        set_weight_matrix(modules[name], q.dequantize())
        check_matches(name, modules[name], q)
        attach(modules[name], q)
    return forms


# -- one entry point ---------------------------------------------------------------------------

def export(model: nn.Module, out: str | os.PathLike, fmt: str, **options) -> dict:
    """Write `model` in format `fmt` (FORMATS) to `out` (a folder for compressed-tensors, a
    file otherwise). Returns {"path", "bytes", "format", ...}."""
    from prunekit.io import save_weights

    if fmt not in FORMATS:
        raise PruneError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "safetensors":
        p = save_weights(model, out)
        res = {"path": str(p), "bytes": p.stat().st_size}
    elif fmt == "prunekit":
        res = save_packed(model, out)
    elif fmt == "compressed-tensors":
        res = save_compressed_tensors(model, out)
    else:
        res = save_gguf(model, out, fmt.split("-")[1], **options)
    return {"format": fmt, **res}
