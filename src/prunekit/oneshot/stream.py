"""Out-of-core pruning: a Llama-architecture transformers folder pruned one block at a time,
for models larger than memory.

`prune_folder(src, out, config, calib)` never holds more than one decoder block's weights.
The model is built on the meta device (shapes, no values). The calibration batches run
through the embeddings alone up to the first block, and from there their hidden states
(float32, one tensor per batch) are carried from block to block. Per block: its tensors are
read from the source's safetensors (memory-mapped, the mapping closed again once they are
copied out), the engine prunes it (`engine.run` on the block alone, under its own name
`model.layers.<i>`, so that layer selection, checks, calibration statistics, per-stage plan
and report are those of `prunekit.prune(model, config, calib)` with sequential=True), the
carried hidden states go through the pruned block, the block is written as its own shard and
its memory handed back (to meta). The embeddings, final norm and head are copied through
unchanged, straight from the source's mapping to the output file.

The same result as in memory: the first block's inputs are caught exactly as `Blockwise`
catches them (same model call, same key/value cache handling), the statistics are gathered
over the same batches in the same order, so the pruned weights are equal bit for bit to
those of the in-memory run on the same batches. With sequential=False every block is
calibrated on the dense model's activations, as the in-memory run does.

Memory: one block's float32 weights (twice while the engine keeps its copy to restore on an
error), the calibration hidden states, the block's seven input Hessians, SparseGPT's working
matrices for the widest layer and one batch's pass through one block: pass small batches
(e.g. `calibration_batches(..., batch_size=1)`) to keep that pass small. At the start the
embedding matrix is mapped (its pages count while the batches run through it). Freed heap
pages go back to the system after each block (glibc's malloc_trim); a process with glibc's
mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=1048576) fragments less within a block
(benchmarks/llm_stream.py: SmolLM2 peaks 241 MB above the baseline with it, 294 MB without).

Resuming: the output is built in `.<out name>.prunekit-stream` beside `out` and renamed into
place when complete. After each block, its shard, the carried hidden states and a progress
record (with a fingerprint of the source files, the config, the calibration batches and the
library versions) are written there; a run with the same fingerprint starts after the last
finished block, any other run starts afresh. Blocks are pruned in float32 and each tensor is
written in the dtype the source stores it in.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from prunekit import batches as batch_pieces
from prunekit.batches import as_batches, micro_batches, token_mask
from prunekit.errors import PruneError
from prunekit.io import atomic_write, atomic_write_text, check_output, tensors_sha256
from prunekit.layers import shared_weights
from prunekit.oneshot.calibrate import Blockwise, _first_output
from prunekit.oneshot.engine import LayerReport, Report, run, select_layers, untie
from prunekit.oneshot.methods.base import PruneConfig
from prunekit.progress import Progress

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock against a second writer
    fcntl = None

_INDEX = "model.safetensors.index.json"
_WORK_SUFFIX = ".prunekit-stream"
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


@dataclass
class StreamReport(Report):
    """The engine's report over every block, plus what each block cost: per block its name,
    seconds in all and for the engine (`prune_s`: statistics and pruning), the forward pass
    of the carried hidden states (`forward_s`), reading and writing (`io_s`), and when it
    ended (`end_s`, from the start of this run). `resumed`: blocks an earlier, interrupted
    run had finished."""

    blocks: list[dict] = field(default_factory=list)
    resumed: int = 0

    def __str__(self) -> str:
        text = super().__str__()
        return text + (f"\n{self.resumed} blocks taken from an interrupted run"
                       if self.resumed else "")


# -- the source folder ------------------------------------------------------------------

class _Source:
    """A Llama-architecture transformers folder: its config, and for every tensor the
    safetensors file holding it. Reads tensors by memory map, one group at a time."""

    def __init__(self, folder: Path):
        from transformers import AutoConfig

        self.folder = folder
        if not folder.is_dir():
            raise PruneError(f"model folder {folder} does not exist")
        if not (folder / "config.json").is_file():
            raise PruneError(f"{folder} has no config.json, so it is not a transformers model "
                             f"folder; save one with prunekit.models.llm.save_pretrained(model, "
                             f"folder)")
        try:
            self.config = AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise PruneError(f"{folder / 'config.json'}: transformers cannot read it "
                             f"({type(e).__name__}: {e})") from e
        archs = getattr(self.config, "architectures", None) or ["LlamaForCausalLM"]
        if self.config.model_type != "llama" or "LlamaForCausalLM" not in archs:
            raise PruneError(f"{folder / 'config.json'}: model_type {self.config.model_type!r} "
                             f"({', '.join(archs)}) is not a Llama-architecture causal LM; "
                             f"prune_folder streams LlamaForCausalLM folders only: load other "
                             f"models with prunekit.models.from_pretrained and use "
                             f"prunekit.prune")
        self.files = self._files()
        self.where: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in sorted(set(self.files.values())):
            try:
                with safe_open(str(folder / name), framework="pt") as f:
                    for k in f.keys():
                        self.where[k] = name
                        self.shapes[k] = tuple(f.get_slice(k).get_shape())
            except Exception as e:  # safetensors raises its own errors and OS errors
                raise PruneError(f"{folder / name} is not a readable safetensors file: "
                                 f"{e}") from e

    def _files(self) -> dict[str, str]:
        """{tensor name: file} from the shard index, or {'': 'model.safetensors'}."""
        index = self.folder / _INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise PruneError(f"{index} is not a safetensors shard index ({e})") from e
            missing = sorted({f for f in weight_map.values()
                              if not (self.folder / f).is_file()})
            if missing:
                raise PruneError(f"{index} names {missing[0]}, which is not in {self.folder}")
            return dict(weight_map)
        if (self.folder / "model.safetensors").is_file():
            return {"": "model.safetensors"}
        other = sorted(p.name for p in self.folder.iterdir() if p.suffix in _WEIGHT_FILES)
        raise PruneError(f"{self.folder} has no model.safetensors (nor {_INDEX})"
                         + (f"; it holds {', '.join(other)}: load it and save it again with "
                            f"prunekit.models.llm.save_pretrained" if other else ""))

    def check_complete(self, skeleton: nn.Module) -> None:
        """Every tensor the model needs is in the files with its shape (tied ones may be
        absent, as transformers writes them)."""
        shared = shared_weights(skeleton)
        for name, t in skeleton.state_dict().items():
            if name not in self.where:
                if any(o in self.where for o in shared.get(name, [])):
                    continue
                raise PruneError(f"{self.folder}: the model's tensor {name} is in none of its "
                                 f"safetensors files")
            shape = self.shapes[name]
            if shape != tuple(t.shape):
                raise PruneError(f"{self.folder}: tensor {name} has shape {shape}, the config "
                                 f"asks for {tuple(t.shape)}")

    @contextlib.contextmanager
    def mapped(self, names):
        """{name: tensor as stored}, memory-mapped: a page is read when touched, and counts
        in the resident set until the mapping closes when the `with` ends."""
        views, handles = {}, []
        try:
            for file, group in _by_file(self.where, names).items():
                handles.append(safe_open(str(self.folder / file), framework="pt"))
                views.update({n: handles[-1].get_tensor(n) for n in group})
            yield views
        finally:
            views.clear()
            for h in handles:
                h.__exit__(None, None, None)

    def read(self, names) -> tuple[dict[str, torch.Tensor], dict[str, torch.dtype]]:
        """({name: float32 copy}, {name: dtype stored}); the mappings are closed on return."""
        with self.mapped(names) as views:
            return ({n: t.to(torch.float32, copy=True) for n, t in views.items()},
                    {n: t.dtype for n, t in views.items()})

    def copy(self, names, path: Path) -> None:
        """The named tensors as they are stored, from the mapping straight into a new file."""
        with self.mapped(names) as views:
            atomic_write(path, lambda tmp: save_file(views, tmp, metadata={"format": "pt"}))

    def fingerprint(self) -> dict:
        files = sorted({*self.files.values(), "config.json"})
        return {f: [os.stat(self.folder / f).st_size, os.stat(self.folder / f).st_mtime_ns]
                for f in files}


def _by_file(where: dict[str, str], names) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(where[n], []).append(n)
    return groups


# -- the model without its weights --------------------------------------------------------

def _skeleton(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _rotary_on_cpu(model: nn.Module) -> None:
    """The rotary table is no weight: computed from the config, as loading computes it."""
    rotary = model.model.rotary_emb
    with torch.device("cpu"):
        model.model.rotary_emb = type(rotary)(config=model.config)


def _load_into(module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()}, assign=True)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.device.type == "meta":
            raise PruneError(f"{prefix}{name} has no value in the source files and is not "
                             f"computed from the config; prune_folder cannot stream this model")


class _Block(nn.Module):
    """One decoder block under its name in the whole model (`model.layers.3`), so that
    layer names, globs and reports are the model's; called with the arguments the model gave
    it. A batch is {'hidden_states', 'call': (args, kwargs)[, 'attention_mask': the
    batch's (batch, tokens) mask of real tokens, for the statistics]}."""

    def __init__(self, path: str, block: nn.Module):
        super().__init__()
        self.path = path
        *parents, leaf = path.split(".")
        holder: nn.Module = self
        for part in parents:
            holder.add_module(part, nn.Module())
            holder = getattr(holder, part)
        holder.add_module(leaf, block)

    def forward(self, hidden_states, call, attention_mask=None):
        args, kwargs = call
        return _first_output(self.get_submodule(self.path)(hidden_states, *args, **kwargs))


# -- the work folder ----------------------------------------------------------------------

class _Work:
    """`.<out>.prunekit-stream` beside `out`: finished blocks' shards, the hidden states after
    the last of them and progress.json, which commits each block (written last)."""

    def __init__(self, out: Path, key: str):
        self.out, self.key = out, key
        self.path = out.parent / f".{out.name}{_WORK_SUFFIX}"
        self.fd = None

    def open(self) -> dict:
        """Lock the folder; the progress of an earlier run with the same key, else {}."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDONLY)
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(self.fd)
                self.fd = None
                raise PruneError(f"another run is writing {self.out} (its work folder "
                                 f"{self.path} is locked); wait for it or choose another "
                                 f"output folder") from None
        try:
            state = json.loads((self.path / "progress.json").read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("key") != self.key or not all(
                (self.path / f).is_file() for f in state.get("files", [])):
            for p in self.path.iterdir():  # another run's, or damaged: start afresh
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            return {}
        return state

    def commit(self, state: dict) -> None:
        atomic_write_text(self.path / "progress.json", json.dumps({**state, "key": self.key}))
        keep = {"progress.json", *state["files"]}
        for p in self.path.glob("carry-*.safetensors"):
            if p.name not in keep:
                p.unlink()

    def finish(self) -> None:
        """Rename the complete folder into place (an old model folder set aside first)."""
        for name in ("progress.json",):
            (self.path / name).unlink(missing_ok=True)
        for p in self.path.glob("carry-*.safetensors"):
            p.unlink()
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old.", dir=self.out.parent))
            os.replace(self.out, old / "model")
        try:
            os.replace(self.path, self.out)
        except OSError:
            if old is not None:
                os.replace(old / "model", self.out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abandon(self) -> None:
        """After an error: keep the finished blocks for the next run, or, with none
        finished, leave nothing behind."""
        if self.fd is not None and not (self.path / "progress.json").exists():
            shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _key(source: _Source, config: PruneConfig, batches: list) -> str:
    """What the result depends on: the source files, the config, the batches, the versions."""
    import transformers

    h = hashlib.sha256()
    h.update(json.dumps([source.fingerprint(), repr(config), torch.__version__,
                         transformers.__version__, batch_pieces.MICRO_TOKENS],
                        sort_keys=True).encode())
    for i, b in enumerate(batches):
        parts = (b.items() if isinstance(b, Mapping) else
                 enumerate([b] if isinstance(b, torch.Tensor) else b))
        h.update(tensors_sha256({f"{i}.{k}": v for k, v in parts
                                 if isinstance(v, torch.Tensor)}).encode())
    return h.hexdigest()


# -- the run ------------------------------------------------------------------------------

def _check(config, source: _Source, out: Path, batches: list) -> None:
    if not isinstance(config, PruneConfig):
        raise PruneError(f"config must be a pruning method config such as "
                         f"prunekit.SparseGPT(...), got {type(config).__name__}")
    if config.needs == "gradients":
        raise PruneError(f"{config.name} needs gradients of the whole model at once; "
                         f"prune_folder streams one block at a time: use SparseGPT, Wanda or "
                         f"magnitude")
    if getattr(config, "scope", "layer") == "global":
        raise PruneError(f"{config.name}(scope='global') compares every layer of the model at "
                         f"once; prune_folder holds one block: use scope='layer'")
    if config.blocks is not None:
        raise PruneError("prune_folder's blocks are the model's decoder layers; leave "
                         "blocks=None")
    if config.needs == "hessian" and not batches:
        raise PruneError(f"{config.name} needs calibration data: pass calib=...")
    if config.sequential and not batches:
        raise PruneError("sequential=True needs calibration data: pass calib=...")
    if out.resolve() == source.folder.resolve():
        raise PruneError(f"out {out} is the source folder; write the pruned model to another "
                         f"folder")
    check_output(out, "out", folder=True)
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").exists():
        raise PruneError(f"out {out} holds files but no config.json: it is not a model folder "
                         f"that may be replaced; choose a new or empty folder")


def _chosen_layers(skeleton: nn.Module, config: PruneConfig, n_blocks: int):
    """The config's layers, checked on the shapes before any work: {block index: [names]}
    and {layer left as it is: why}."""
    layers, skipped = untie(skeleton, select_layers(skeleton, config), config)
    per_block: dict[int, list[str]] = {i: [] for i in range(n_blocks)}
    for name, module in layers.items():
        parts = name.split(".")
        if parts[:2] != ["model", "layers"] or len(parts) < 4:
            raise PruneError(f"{name} is outside the decoder blocks; prune_folder prunes the "
                             f"blocks' layers only: add {name!r} to exclude")
        config.check_layer(name, module)
        per_block[int(parts[2])].append(name)
    return per_block, skipped


@torch.no_grad()
def _carry(block: nn.Module, carried: list) -> None:
    """The carried hidden states through `block`, one batch at a time, in place."""
    for item in carried:
        args, kwargs = item["call"]
        item["hidden_states"] = _first_output(block(item["hidden_states"], *args, **kwargs))


def prune_folder(src: str | os.PathLike, out: str | os.PathLike, config: PruneConfig,
                 calib=None, *, progress: bool = False) -> StreamReport:
    """Prune the Llama-architecture transformers folder `src` into the folder `out`, one
    decoder block in memory at a time (see the module docstring); calib is a batch or an
    iterable of batches of token ids, as for `prunekit.prune`. The pruned weights are those
    `prunekit.prune(model, config, calib)` gives the loaded model; layers outside the blocks
    (the head) must be excluded or tied to the embeddings. Returns the engine's report with
    each block's cost (StreamReport). `out` gets the source's config and tokenizer files and
    one safetensors shard per block; it appears complete or not at all, and an interrupted
    run resumes from its last finished block."""
    src, out = Path(src), Path(out)
    batches = as_batches(calib)
    source = _Source(src)
    _check(config, source, out, batches)
    skeleton = _skeleton(source.config)
    source.check_complete(skeleton)
    n_blocks = len(skeleton.model.layers)
    per_block, skipped = _chosen_layers(skeleton, config, n_blocks)

    report = StreamReport(config.name, config.target(), config.options(), skipped=skipped)
    start = time.perf_counter()
    work = _Work(out, _key(source, config, batches))
    try:
        state = work.open()
        done = state.get("done", 0)
        report.layers = [LayerReport(**{**lr, "shape": tuple(lr["shape"])})
                         for lr in state.get("layers", [])]
        report.blocks = state.get("blocks", [])
        report.resumed = done
        carried = (_catch_inputs(skeleton, source, micro_batches(batches), work, state)
                   if batches and done < n_blocks else [])
        total = n_blocks + 1
        files = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        with Progress(enabled=progress) as bar:
            task = bar.add(f"{config.name}: blocks", total=n_blocks)
            bar.advance(task, done)
            for i in range(done, n_blocks):
                record = _prune_block(i, skeleton, source, config, per_block[i], carried,
                                      work.path / files[i], report)
                record["end_s"] = time.perf_counter() - start
                report.blocks.append(record)
                carry = []
                if carried:
                    carry = [f"carry-{i + 1:05d}.safetensors"]
                    atomic_write(work.path / carry[0], lambda tmp: save_file(
                        {str(j): c["hidden_states"] for j, c in enumerate(carried)}, tmp))
                work.commit({"done": i + 1, "files": files[:i + 1] + carry,
                             "layers": [dataclasses.asdict(lr) for lr in report.layers],
                             "blocks": report.blocks})
                bar.advance(task)
        carried.clear()
        _finish(source, work, files)
    except BaseException:
        work.abandon()
        raise
    finally:
        work.close()
    report.seconds = time.perf_counter() - start
    return report


def _catch_inputs(skeleton: nn.Module, source: _Source, batches: list, work: _Work,
                  state: dict) -> list[dict]:
    """The first block's inputs per batch, caught as `Blockwise` catches them (only the
    embeddings and the rotary table in memory, for as long as this takes); the hidden
    states are those after the last finished block when resuming."""
    embed = skeleton.get_input_embeddings()
    names = [n for n in source.where if n.startswith("model.embed_tokens.")]
    _rotary_on_cpu(skeleton)
    with source.mapped(names) as views:  # float32 rows read in place: only those looked up
        _load_into(embed, "model.embed_tokens.", {n: t.float() for n, t in views.items()})
        try:
            inputs, _ = Blockwise(skeleton, {}, batches)._catch_block_inputs({})
        finally:
            embed.to("meta")
    carried = []
    for (args, kwargs), batch in zip(inputs, batches):
        if not args:
            raise PruneError("the first block was called without a positional hidden state; "
                             "prune_folder cannot carry it")
        item = {"hidden_states": args[0], "call": (args[1:], kwargs)}
        mask = token_mask(batch)
        if mask is not None:
            item["attention_mask"] = mask
        carried.append(item)
    saved = [f for f in state.get("files", []) if f.startswith("carry-")]
    if saved:
        with safe_open(str(work.path / saved[0]), framework="pt") as f:
            if len(f.keys()) != len(carried):
                raise PruneError(f"{work.path / saved[0]} holds {len(f.keys())} hidden states "
                                 f"for {len(carried)} calibration pieces; remove "
                                 f"{work.path} to start again")
            for j, item in enumerate(carried):
                item["hidden_states"] = f.get_tensor(str(j)).clone()
    return carried


def _prune_block(i: int, skeleton: nn.Module, source: _Source, config: PruneConfig,
                 names: list[str], carried: list[dict], shard: Path,
                 report: StreamReport) -> dict:
    """Read, prune and write block i; the carried hidden states move past it."""
    t0 = time.perf_counter()
    prefix = f"model.layers.{i}."
    block = skeleton.model.layers[i]
    tensors, dtypes = source.read([n for n in source.where if n.startswith(prefix)])
    own = set(block.state_dict())
    extra = [n for n in tensors if n[len(prefix):] not in own]  # written back as they were
    _load_into(block, prefix, {n: t for n, t in tensors.items() if n not in extra})
    t1 = time.perf_counter()
    forward_s = 0.0
    if carried and not config.sequential:  # calibrated on the dense model: carry it first
        before = [dict(c) for c in carried]
        _carry(block, carried)
        forward_s = time.perf_counter() - t1
    else:
        before = carried
    t2 = time.perf_counter()
    if names:
        one = dataclasses.replace(config, include=tuple(names), exclude=(), keep_first=False,
                                  keep_last=False, sequential=False)
        got = run(_Block(f"model.layers.{i}", block), one, before or None, progress=False)
        report.layers.extend(got.layers)
    del before
    t3 = time.perf_counter()
    if carried and config.sequential:
        _carry(block, carried)
        forward_s = time.perf_counter() - t3
    t4 = time.perf_counter()
    pruned = {prefix + k: v.detach().to(dtypes[prefix + k]).contiguous()
              for k, v in block.state_dict().items()}
    pruned.update({n: tensors[n].to(dtypes[n]) for n in extra})
    del tensors
    atomic_write(shard, lambda tmp: save_file(pruned, tmp, metadata={"format": "pt"}))
    pruned.clear()
    block.to("meta")
    _return_freed_memory()
    io_s = (t1 - t0) + (time.perf_counter() - t4)
    return {"block": prefix[:-1], "seconds": time.perf_counter() - t0, "prune_s": t3 - t2,
            "forward_s": forward_s, "io_s": io_s}


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; None elsewhere
    except (OSError, AttributeError, TypeError):
        return None


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the system. A block's working memory is freed in
    pieces under glibc's mmap threshold (which grows to 32 MiB as large pieces are freed),
    and the heap keeps such pieces: without this the resident set crept up block after
    block (SmolLM2, Wanda: +180 MB over its 30 blocks)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _finish(source: _Source, work: _Work, files: list[str]) -> None:
    """The embeddings, final norm and head as stored, the shard index, the config and the
    tokenizer files; then the folder goes into place."""
    rest = sorted(n for n in source.where if not n.startswith("model.layers."))
    source.copy(rest, work.path / files[-1])
    weight_map, total = {}, 0
    for file in files:
        with safe_open(str(work.path / file), framework="pt") as f:
            for name in f.keys():
                weight_map[name] = file
                sl = f.get_slice(name)
                total += _numel(sl.get_shape()) * _itemsize(sl.get_dtype())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(work.path / _INDEX, json.dumps(index, indent=2) + "\n")
    for p in source.folder.iterdir():
        if p.is_file() and p.name != _INDEX and p.suffix not in _WEIGHT_FILES:
            shutil.copy2(p, work.path / p.name)
    work.finish()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name ('F32', 'BF16', 'I64', 'BOOL', ...)."""
    if dtype == "BOOL":
        return 1
    bits = "".join(c for c in dtype if c.isdigit())
    return max(1, int(bits) // 8) if bits else 1
