"""Fuzzing the weight files: truncations, flipped bytes, foreign files, and tensors with the
wrong dtype, shape, name or values. The property, for every generated case: load_weights
raises a PruneError that names the file (and the tensor, where one is at fault) and leaves
the model as it was, or the model holds exactly the file's tensors and they are right."""

import pickle
import sqlite3

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit import PruneError
from prunekit.io import load_weights, read_weights, save_weights

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
    return m


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def bit_equal(a, b) -> bool:
    """Same dtype, shape and bits (NaN included, -0.0 told from 0.0)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert bit_equal(a[k], b[k]), k


def load_or_refuse(path, original: dict, must_name: str | None = None):
    """The property. Returns 'refused' or 'loaded'."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3))
    before = snapshot(model)
    try:
        load_weights(model, path)
    except PruneError as e:
        assert str(path) in str(e), e
        if must_name is not None:
            assert must_name in str(e), e
        assert_same(snapshot(model), before)
        return "refused"
    assert_same(snapshot(model), original)
    return "loaded"


class Saved(tuple):
    def __repr__(self):
        return "<the bytes and tensors of a saved net()>"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz_io") / "w.safetensors"
    save_weights(net(), path, metadata={"note": "fuzz"})
    return Saved((path.read_bytes(), snapshot(net())))


@FUZZ
@given(data=st.data())
def test_truncated_or_flipped_files_are_refused_or_load_exactly(tmp_path, saved, data):
    blob, original = saved
    kind = data.draw(st.sampled_from(["truncate", "flip", "burst", "append", "header-length"]))
    b = bytearray(blob)
    if kind == "truncate":
        b = b[:data.draw(st.integers(0, len(b) - 1))]
    elif kind == "flip":
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] ^= data.draw(st.integers(1, 255))
    elif kind == "burst":  # a damaged run of bytes, as from a bad sector
        start = data.draw(st.integers(0, len(b) - 2))
        for i in range(start, min(len(b), start + data.draw(st.integers(2, 8)))):
            b[i] ^= data.draw(st.integers(1, 255))
    elif kind == "append":
        b += data.draw(st.binary(min_size=1, max_size=64))
    else:  # the 8-byte little-endian header length
        b[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    path = tmp_path / f"{kind}.safetensors"
    path.write_bytes(bytes(b))
    load_or_refuse(path, original)


def _foreign(tmp_path, kind):
    path = tmp_path / "foreign.safetensors"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "json":
        path.write_text('{"weights": [1, 2, 3]}')
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"0.weight": [1.0]}))
    elif kind == "torch":
        torch.save(net().state_dict(), path)
    elif kind == "sqlite":
        sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    elif kind == "folder":
        path.mkdir()
    elif kind == "random":
        path.write_bytes(torch.randint(0, 256, (300,), dtype=torch.uint8).numpy().tobytes())
    return path


@pytest.mark.parametrize("kind", ["empty", "json", "pickle", "torch", "sqlite", "folder",
                                  "random"])
def test_foreign_files_are_refused_by_name(tmp_path, kind):
    assert load_or_refuse(_foreign(tmp_path, kind), snapshot(net())) == "refused"


NAMES = ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
         "3.weight", "3.bias"]
SPECIAL = [float("nan"), float("inf"), float("-inf")]


@FUZZ
@given(data=st.data())
def test_wrong_tensors_are_refused_by_name_or_load_exactly(tmp_path, data):
    """Valid files with one tensor changed: values, dtype, shape, name, or left out."""
    original = snapshot(net())
    state = {k: v.clone() for k, v in original.items()}
    name = data.draw(st.sampled_from(NAMES))
    kind = data.draw(st.sampled_from(["special", "dtype", "shape", "rename", "drop", "extra"]))
    t = state[name]
    if kind == "special":
        for _ in range(data.draw(st.integers(1, 3))):
            t.view(-1)[data.draw(st.integers(0, t.numel() - 1))] = data.draw(
                st.sampled_from(SPECIAL))
    elif kind == "dtype":
        dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64,
                                           torch.int64, torch.int8, torch.bool,
                                           torch.complex64]))
        state[name] = t.to(dtype)
    elif kind == "shape":
        state[name] = data.draw(st.sampled_from([t.reshape(-1, 1), t.reshape(1, -1),
                                                 t.reshape(-1)[:-1], torch.cat([t, t])]))
        if state[name].shape == t.shape:
            state[name] = t.reshape(1, *t.shape)
    elif kind == "rename":
        state[name + "x"] = state.pop(name)
    elif kind == "drop":
        del state[name]
    else:
        state["extra.weight"] = torch.zeros(2)
    path = save_weights(state, tmp_path / "w.safetensors")
    result = load_or_refuse(path, original if kind != "dtype" else
                            {k: v.to(original[k].dtype) for k, v in state.items()},
                            must_name=name if kind not in ("extra",) else "extra.weight")
    if kind in ("special", "shape", "rename", "drop", "extra"):
        assert result == "refused"
    if kind == "dtype":  # a float file loads into a float model; other kinds are refused
        assert (result == "loaded") == state[name].is_floating_point()


@FUZZ
@given(values=st.lists(st.floats(width=32), min_size=12, max_size=12))
def test_read_weights_returns_exactly_what_was_saved(tmp_path, values):
    """Any float32 values round-trip bit for bit, NaN and -0.0 included (reading does not
    judge; loading into a model does)."""
    t = torch.tensor(values, dtype=torch.float32).reshape(3, 4)
    path = save_weights({"t": t}, tmp_path / "t.safetensors")
    back = read_weights(path)["t"]
    assert torch.equal(back.view(torch.int32), t.view(torch.int32))


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    from prunekit.runtime.export import load_compressed, save_compressed

    torch.manual_seed(0)  # module-scoped: the same file whichever tests ran before
    model = net()
    with torch.no_grad():
        model[0].weight[torch.rand_like(model[0].weight) < 0.6] = 0
        model[3].weight[torch.rand_like(model[3].weight) < 0.6] = -0.0
    path = tmp_path_factory.mktemp("fuzz_io") / "c.safetensors"
    save_compressed(model, path)
    return Saved((path.read_bytes(), load_compressed(path)))


@FUZZ
@given(data=st.data())
def test_damaged_compressed_files_are_refused_or_load_exactly(tmp_path, compressed, data):
    from prunekit.runtime.export import load_compressed

    blob, original = compressed
    b = bytearray(blob)
    if data.draw(st.booleans()):
        b = b[:data.draw(st.integers(0, len(b) - 1))]
    else:
        start = data.draw(st.integers(0, len(b) - 1))
        for i in range(start, min(len(b), start + data.draw(st.integers(1, 4)))):
            b[i] ^= data.draw(st.integers(1, 255))
    path = tmp_path / "c.safetensors"
    path.write_bytes(bytes(b))
    try:
        state = load_compressed(path)
    except PruneError as e:
        assert str(path) in str(e), e
        return
    assert_same(state, original)


def test_every_flipped_low_bit_of_a_compressed_file_is_refused_or_loads_exactly(tmp_path,
                                                                                compressed):
    """Exhaustive over the file: a digit of a header shape changed by one (a bias of 4
    becoming 5 where one bitmask byte covers both) used to load silently; the header's
    metadata now carries its own sha256."""
    from prunekit.runtime.export import load_compressed

    blob, original = compressed
    path = tmp_path / "c.safetensors"
    silent = []
    for i in range(len(blob)):
        b = bytearray(blob)
        b[i] ^= 1
        path.write_bytes(bytes(b))
        try:
            state = load_compressed(path)
        except PruneError:
            continue
        if state.keys() != original.keys() or not all(bit_equal(state[k], original[k])
                                                      for k in state):
            silent.append(i)
    assert not silent, f"flipped bytes that loaded other weights: {silent[:10]}"


def test_a_header_shape_changed_within_its_bitmask_byte_is_refused(tmp_path):
    """An all-zero bias of 4 stored as a bitmask: one mask byte covers 4 and 5 entries, so only
    the header's own checksum can tell a shape of [5] from [4]."""
    from prunekit.runtime.export import load_compressed, save_compressed

    path = tmp_path / "c.safetensors"
    save_compressed({"w": torch.zeros(4), "v": torch.ones(3)}, path, min_sparsity=0.0)
    blob = path.read_bytes()
    assert blob.count(b'[4]') == 1
    path.write_bytes(blob.replace(b'[4]', b'[5]'))
    with pytest.raises(PruneError, match="header metadata"):
        load_compressed(path)
