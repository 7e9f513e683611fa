"""Weights in and out: safetensors only, checked on the way in, written atomically.

Out: `atomic_write` writes a temporary file beside the target and renames it into place, so a
reader (or a killed run) only ever sees the old file or the complete new one; the new file
gets the mode the umask gives (or the mode of the file it replaces). The temporary file is
locked while it is written: a writer that is killed leaves it unlocked, and the next write to
the same path removes it. `check_output` refuses, before any work, a path that cannot be
written. `save_weights` records the sha256 of the tensors in the file's header.

In: `read_weights` reads safetensors (a pickle only with allow_pickle=True, since unpickling
runs code) and checks the recorded sha256, which catches a damaged file that safetensors
itself would read; `load_weights` checks every tensor against the model (name, shape, kind of
dtype, finite values) before it changes anything.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from prunekit.errors import PruneError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locks, so no cleaning of leftovers
    fcntl = None

#: Header metadata key holding the sha256 of a file's tensors (see tensors_sha256).
CHECKSUM_KEY = "prunekit_tensors_sha256"
#: the sha256 of the header's other metadata (shapes of compressed tensors, reports, configs)
META_CHECKSUM_KEY = "prunekit_metadata_sha256"
_TMP_SUFFIX = ".prunekit-tmp"


# -- out ---------------------------------------------------------------------------------

def _umask() -> int:
    try:
        with open("/proc/self/status") as f:  # read without changing it (threads)
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _locked(fd: int) -> bool:
    """Take the lock that marks a temporary file as being written; False if it is taken."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _remove_leftovers(path: Path) -> None:
    """Delete the temporary folders (and, from older versions, files) of earlier writes to
    `path` whose writer died: those whose lock is free."""
    if fcntl is None:
        return
    prefix = f".{path.name}."
    try:
        names = [n for n in os.listdir(path.parent)
                 if n.startswith(prefix) and n.endswith(_TMP_SUFFIX)]
    except OSError:
        return
    for name in names:
        tmp = path.parent / name
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue  # renamed or removed meanwhile
        try:
            if _locked(fd) and os.path.exists(tmp) and os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                if os.path.isdir(tmp):
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    os.unlink(tmp)
        except OSError:
            pass
        finally:
            os.close(fd)


def _temp_beside(path: Path) -> tuple[int, Path]:
    """A new, locked private folder in path's folder: (fd holding the lock, folder).

    The new file is written inside it, not beside `path`: a library that makes its own
    temporary file next to the file it is given (safetensors writes `.tmpXXXXXX` and renames
    it) then makes it inside this folder, and a killed write leaves nothing that the next
    write's cleaner does not remove."""
    while True:
        tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
        fd = os.open(tmp, os.O_RDONLY)
        if _locked(fd) and os.path.exists(tmp) and os.stat(tmp).st_ino == os.fstat(fd).st_ino:
            return fd, Path(tmp)
        os.close(fd)  # another process's cleaner took it for a leftover: draw another name


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it into place:
    `path` holds its old content or the complete new one, never a part. The file gets the
    mode of the file it replaces, or 0o666 less the umask; an OSError is a PruneError that
    names `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(path)
        fd, folder = _temp_beside(path)
    except OSError as e:
        raise PruneError(f"cannot write {path}: {e.strerror or e}") from e
    tmp = folder / path.name
    try:
        try:
            mode = path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_umask()
            write(tmp)
            os.chmod(tmp, mode)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise PruneError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write)


def check_output(path: str | os.PathLike, what: str = "output", folder: bool = False) -> Path:
    """Refuse, before any work, an output path that cannot be written: a folder where a file
    is wanted (or a file where a folder is), a file in the way of a folder to create, or a
    folder this process may not write in. Creates nothing. `what` names it (e.g. '--out')."""
    path = Path(path)
    if str(path) in ("", "."):
        if not folder:
            raise PruneError(f"{what}: give a file name")
    try:
        if folder and path.exists() and not path.is_dir():
            raise PruneError(f"{what} {path} is not a folder; give a folder for the files")
        if not folder and path.is_dir():
            raise PruneError(f"{what} {path} is a folder; give a file name, e.g. "
                             f"{path / 'model.safetensors'}")
        if not folder and path.exists() and not path.is_file():
            raise PruneError(f"{what} {path} is not a regular file")
        existing = path if folder else path.parent
        existing = existing.absolute()
        while not existing.exists() and existing != existing.parent:
            if existing.is_symlink():
                raise PruneError(f"{what} {path}: {existing} is a broken link")
            existing = existing.parent
        if not existing.is_dir():
            raise PruneError(f"{what} {path} cannot be created: {existing} is a file, not a "
                             f"folder")
    except OSError as e:
        raise PruneError(f"{what} {path}: {e.strerror or e}") from e
    try:
        fd, probe = tempfile.mkstemp(prefix=".prunekit-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PruneError(f"{what} {path}: folder {existing} is not writable "
                         f"({e.strerror or e}); choose another path") from e
    return path


def metadata_sha256(meta: dict) -> str:
    """Content hash of a header's metadata, the two checksums themselves left out."""
    rest = sorted((k, v) for k, v in meta.items() if k not in (CHECKSUM_KEY, META_CHECKSUM_KEY))
    return hashlib.sha256(json.dumps(rest).encode()).hexdigest()


def tensors_sha256(tensors: dict) -> str:
    """Content hash of a state dict: names, dtypes, shapes and bytes, in name order (so the
    file's metadata and layout do not matter)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_weights(model_or_state: nn.Module | dict, path: str | os.PathLike,
                 metadata: dict | None = None) -> Path:
    """Save a state dict as safetensors atomically (shared tensors are stored once each),
    with the sha256 of the tensors in the header."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors, seen = {}, {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else None
        if key is not None and key in seen:
            continue  # tied weight: saved under its first name
        if key is not None:
            seen[key] = k
        tensors[k] = v.detach().contiguous().cpu()
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return write_safetensors(tensors, path, meta)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                      meta: dict[str, str]) -> Path:
    """Write tensors and string metadata atomically, signed with the sha256 of the tensors and
    of the metadata (read_safetensors checks both)."""
    meta = {**meta, CHECKSUM_KEY: tensors_sha256(tensors)}
    meta[META_CHECKSUM_KEY] = metadata_sha256(meta)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


# -- in ----------------------------------------------------------------------------------

def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, header metadata) of a safetensors file; a damaged file, or one whose tensors
    do not match the sha256 its header records, is a PruneError."""
    path = Path(path)
    if not path.exists():
        raise PruneError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own and OS errors; none may escape raw
        raise PruneError(f"{path} is not a readable safetensors file: {e}") from e
    want = meta.get(CHECKSUM_KEY)
    if want is not None and tensors_sha256(tensors) != want:
        raise PruneError(f"{path} is corrupt: its tensors do not match the sha256 recorded "
                         f"when it was written; write or copy it again")
    want = meta.get(META_CHECKSUM_KEY)
    if want is not None and metadata_sha256(meta) != want:
        raise PruneError(f"{path} is corrupt: its header metadata does not match the sha256 "
                         f"recorded when it was written; write or copy it again")
    return tensors, meta


def read_weights(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file; pickle checkpoints only with allow_pickle=True."""
    path = Path(path)
    if not path.exists():
        raise PruneError(f"weights file {path} does not exist")
    if path.suffix != ".safetensors":
        if not allow_pickle:
            raise PruneError(
                f"{path}: only safetensors files are read by default, since a pickle checkpoint "
                f"can run code when loaded; convert it, or pass allow_pickle=True "
                f"(--allow-pickle) if you trust the file")
        return _read_pickle(path)
    return read_safetensors(path)[0]


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # unpickling raises anything at all
        raise PruneError(f"{path} is not a readable PyTorch checkpoint: "
                         f"{type(e).__name__}: {e}") from e
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise PruneError(f"{path} holds a {type(obj).__name__}, not a state dict of named "
                         f"tensors (or a module, or a dict with one under 'state_dict')")
    return obj


def check_loaded(path, tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Refuse, before anything is loaded, tensors that would load silently wrong: NaN or Inf
    (unless the model holds the very same non-finite values there, as a mask buffer may),
    or another kind of dtype than the model's (load_state_dict would cast an int64 or bool
    tensor into a float weight, or a float into an integer buffer)."""
    for k, v in tensors.items():
        mine = own.get(k)
        if mine is not None and _kind(v) != _kind(mine):
            raise PruneError(f"{path}: tensor {k} has dtype {v.dtype}, the model's has "
                             f"{mine.dtype}; load it into the model it was saved from")
        if v.is_floating_point() or v.is_complex():
            bad = ~torch.isfinite(v)
            if bool(bad.any()) and not (mine is not None and mine.shape == v.shape
                                        and torch.equal(_special(v), _special(mine))):
                what = " and ".join(w for w, n in (("NaN", int(torch.isnan(v).sum())),
                                                   ("Inf", int(torch.isinf(v).sum()))) if n)
                raise PruneError(f"{path}: tensor {k} holds {what} ({int(bad.sum())} of "
                                 f"{v.numel()} values); the file is damaged or the run that "
                                 f"wrote it diverged")


def _special(t: torch.Tensor) -> torch.Tensor:
    """Where t is NaN (1), +Inf (2), -Inf (3) or finite (0)."""
    return (torch.isnan(t) * 1 + torch.isposinf(t) * 2 + torch.isneginf(t) * 3
            if not t.is_complex() else torch.isnan(t) * 1 + torch.isinf(t) * 2)


def _kind(t: torch.Tensor) -> str:
    return ("complex" if t.is_complex() else "float" if t.is_floating_point()
            else "bool" if t.dtype == torch.bool else "int")


def load_weights(model: nn.Module, path: str | os.PathLike, allow_pickle: bool = False,
                 strict: bool = True, optional: Sequence[str] = ()) -> nn.Module:
    """Load weights into `model`, naming the first missing, unexpected, mis-shaped,
    wrong-kind or non-finite tensor; the model is changed only when every check passed.
    Model tensors matching an `optional` pattern (fnmatch) may be absent from the file."""
    state = read_weights(path, allow_pickle)
    own = model.state_dict()
    for name, t in state.items():
        if name in own and tuple(own[name].shape) != tuple(t.shape):
            raise PruneError(f"{path}: tensor {name} has shape {tuple(t.shape)} but the model "
                             f"expects {tuple(own[name].shape)}")
    if strict:
        unexpected = [k for k in state if k not in own]
        if unexpected:
            raise PruneError(f"{path}: tensor {unexpected[0]} is not in the model "
                             f"({len(unexpected)} unexpected in all)")
        tied = _tied_names(model)
        missing = [k for k in own if k not in state and k not in tied
                   and not k.endswith("num_batches_tracked")
                   and not any(fnmatch.fnmatchcase(k, p) for p in optional)]
        if missing:
            raise PruneError(f"{path}: the model's tensor {missing[0]} is missing from the file "
                             f"({len(missing)} missing in all)")
    check_loaded(path, {k: v for k, v in state.items() if k in own}, own)
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    return model


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names that share storage with an earlier name (tied embeddings)."""
    seen, tied = set(), set()
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else None
        if key is not None and key in seen:
            tied.add(k)
        elif key is not None:
            seen.add(key)
    return tied
