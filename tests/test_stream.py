"""Out-of-core pruning (prunekit.oneshot.prune_folder): a transformers folder pruned one
block at a time gives the very weights `prunekit.prune` gives in memory (torch.equal: the
same block inputs, statistics and engine), reloads in plain transformers with the same
logits, holds one block at a time, resumes after an interruption, and refuses bad input
before any work."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.errors import PruneError
from prunekit.models.tiny import create_tiny
from prunekit.oneshot import prune_folder, stream

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_folder(path, tied=True, dtype=torch.float32, **save):
    """A 4-block random Llama with grouped-query attention (4 heads, 2 key/value heads),
    saved as transformers saves it, plus a tokenizer file to be copied through."""
    model = create_tiny("llama", num_hidden_layers=4, tie_word_embeddings=tied).to(dtype)
    model.save_pretrained(path, **save)
    (path / "tokenizer.json").write_text('{"stand-in": "copied through unchanged"}')
    return path


def batches(mask=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        b = {"input_ids": torch.randint(0, 128, (2, 24), generator=g)}
        if mask:  # the second row ends in padding: its tokens are not calibration data
            b["attention_mask"] = torch.ones(2, 24, dtype=torch.long)
            b["attention_mask"][1, 17:] = 0
        out.append(b)
    return out


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def in_memory(src, config, calib):
    model = load(src)
    report = prunekit.prune(model, config, calib, progress=False)
    return model, report


def assert_same_model(streamed, expected):
    a, b = streamed.state_dict(), expected.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, expected(ids).logits)


CONFIGS = {
    "sparsegpt-50%": prunekit.SparseGPT(sparsity=0.5, sequential=True, exclude=("lm_head",)),
    "sparsegpt-2:4": prunekit.SparseGPT(pattern="2:4", sequential=True, exclude=("lm_head",)),
    "wanda-50%": prunekit.Wanda(sparsity=0.5, sequential=True, exclude=("lm_head",)),
    "sparsegpt-50%-dense-calibration": prunekit.SparseGPT(sparsity=0.5, exclude=("lm_head",)),
    "magnitude-50%": prunekit.Magnitude(sparsity=0.5, exclude=("lm_head",)),
}


@pytest.mark.parametrize("key", list(CONFIGS))
def test_streamed_equals_in_memory(tmp_path, key):
    """The same pruned weights bit for bit, the same report rows, the same logits after a
    plain transformers reload; config and tokenizer files copied; no work folder left."""
    config = CONFIGS[key]
    src = tiny_folder(tmp_path / "src")
    calib = batches() if config.needs != "none" else None
    expected, want = in_memory(src, config, calib)
    report = prune_folder(src, tmp_path / "out", config, calib)
    assert_same_model(load(tmp_path / "out"), expected)
    assert [(r.name, r.shape, r.sparsity, r.rel_error) for r in report.layers] == \
        [(r.name, r.shape, r.sparsity, r.rel_error) for r in want.layers]
    assert report.skipped == want.skipped
    assert len(report.blocks) == 4 and report.resumed == 0
    assert (tmp_path / "out" / "tokenizer.json").read_text() == \
        (src / "tokenizer.json").read_text()
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == \
        json.loads((src / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_padding_tokens_left_out_of_the_statistics_as_in_memory(tmp_path):
    src = tiny_folder(tmp_path / "src")
    config = CONFIGS["sparsegpt-50%"]
    expected, _ = in_memory(src, config, batches(mask=True))
    prune_folder(src, tmp_path / "out", config, batches(mask=True))
    assert_same_model(load(tmp_path / "out"), expected)
    # and the mask matters: without it the pruned weights differ
    prune_folder(src, tmp_path / "unmasked", config,
                 [{"input_ids": b["input_ids"]} for b in batches(mask=True)])
    assert not torch.equal(load(tmp_path / "unmasked").model.layers[0].mlp.up_proj.weight,
                           expected.model.layers[0].mlp.up_proj.weight)


def test_untied_head_sharded_source_and_bfloat16(tmp_path):
    """A sharded bfloat16 source with its own head: the head is copied as it is stored,
    every pruned tensor is written back in bfloat16 (the float32 result rounded once)."""
    src = tiny_folder(tmp_path / "src", tied=False, dtype=torch.bfloat16, max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").exists()
    config = CONFIGS["sparsegpt-50%"]
    expected, _ = in_memory(src, config, batches())
    prune_folder(src, tmp_path / "out", config, batches())
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    for name, t in got.state_dict().items():
        assert t.dtype == torch.bfloat16, name
        assert torch.equal(t, expected.state_dict()[name].to(torch.bfloat16)), name
    assert torch.equal(got.lm_head.weight, load(src).lm_head.weight.to(torch.bfloat16))


def test_one_block_in_memory_at_a_time(tmp_path, monkeypatch):
    """While the engine prunes block i, block i alone of the model holds values: every other
    block, the embeddings and the head are on the meta device."""
    src = tiny_folder(tmp_path / "src")
    made, seen = [], []
    skeleton, engine_run = stream._skeleton, stream.run
    monkeypatch.setattr(stream, "_skeleton", lambda cfg: made.append(skeleton(cfg)) or made[-1])

    def spy(stage, config, calib, **kw):
        seen.append({n.split(".")[2] if n.startswith("model.layers.") else n
                     for n, p in made[0].named_parameters() if p.device.type != "meta"})
        return engine_run(stage, config, calib, **kw)
    monkeypatch.setattr(stream, "run", spy)
    prune_folder(src, tmp_path / "out", CONFIGS["sparsegpt-50%"], batches())
    assert seen == [{"0"}, {"1"}, {"2"}, {"3"}]
    assert all(p.device.type == "meta" for p in made[0].parameters())


def test_interrupted_run_resumes_after_its_last_finished_block(tmp_path, monkeypatch):
    src = tiny_folder(tmp_path / "src")
    config = CONFIGS["sparsegpt-50%"]
    expected, _ = in_memory(src, config, batches())
    prune_block, calls = stream._prune_block, []

    def interrupted(i, *args):
        calls.append(i)
        if i == 2:
            raise KeyboardInterrupt
        return prune_block(i, *args)
    monkeypatch.setattr(stream, "_prune_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prune_folder(src, tmp_path / "out", config, batches())
    assert not (tmp_path / "out").exists()
    work = tmp_path / ".out.prunekit-stream"
    assert json.loads((work / "progress.json").read_text())["done"] == 2

    calls.clear()
    monkeypatch.setattr(stream, "_prune_block", lambda i, *args: calls.append(i) or
                        prune_block(i, *args))
    report = prune_folder(src, tmp_path / "out", config, batches())
    assert calls == [2, 3] and report.resumed == 2 and len(report.layers) == 28
    assert_same_model(load(tmp_path / "out"), expected)
    assert not work.exists()

    # another config does not reuse the first run's blocks
    monkeypatch.setattr(stream, "_prune_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prune_folder(src, tmp_path / "again", config, batches())
    calls.clear()
    monkeypatch.setattr(stream, "_prune_block", lambda i, *args: calls.append(i) or
                        prune_block(i, *args))
    prune_folder(src, tmp_path / "again", CONFIGS["wanda-50%"], batches())
    assert calls == [0, 1, 2, 3]


def test_an_existing_model_folder_is_replaced_whole(tmp_path):
    src = tiny_folder(tmp_path / "src")
    out = tiny_folder(tmp_path / "out", tied=False)
    prune_folder(src, out, CONFIGS["magnitude-50%"])
    assert "lm_head.weight" not in json.loads(
        (out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not (out / "model.safetensors").exists()


def gpt2_folder(path):
    create_tiny("gpt2").save_pretrained(path)
    return path


BAD = {
    "no config.json": (lambda p: (p / "src").mkdir() or p / "src", CONFIGS["sparsegpt-50%"],
                       True, "has no config.json"),
    "not llama": (lambda p: gpt2_folder(p / "src"), CONFIGS["sparsegpt-50%"], True,
                  "model_type 'gpt2'"),
    "no calibration": (lambda p: tiny_folder(p / "src"), CONFIGS["sparsegpt-50%"], False,
                       "sparsegpt needs calibration data"),
    "sequential without calibration": (
        lambda p: tiny_folder(p / "src"), prunekit.Magnitude(sparsity=0.5, sequential=True),
        False, "sequential=True needs calibration data"),
    "untied head chosen": (lambda p: tiny_folder(p / "src", tied=False),
                           prunekit.SparseGPT(sparsity=0.5, sequential=True), True,
                           "lm_head is outside the decoder blocks"),
    "global scope": (lambda p: tiny_folder(p / "src"),
                     prunekit.Magnitude(sparsity=0.5, scope="global"), False, "scope='global'"),
    "pattern that does not tile": (lambda p: tiny_folder(p / "src"),
                                   prunekit.Magnitude(pattern="3:7", exclude=("lm_head",)),
                                   False, "q_proj"),
    "no weights": (lambda p: (tiny_folder(p / "src") / "model.safetensors").unlink()
                   or p / "src", CONFIGS["sparsegpt-50%"], True, "no model.safetensors"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_before_any_work(tmp_path, case):
    make, config, with_calib, message = BAD[case]
    src = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(PruneError, match=message):
        prune_folder(src, tmp_path / "out", config, batches() if with_calib else None)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_out_must_not_be_the_source_nor_a_foreign_folder(tmp_path):
    src = tiny_folder(tmp_path / "src")
    with pytest.raises(PruneError, match="is the source folder"):
        prune_folder(src, src, CONFIGS["magnitude-50%"])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(PruneError, match="holds files but no config.json"):
        prune_folder(src, tmp_path / "notes", CONFIGS["magnitude-50%"])


@pytest.mark.slow
@pytest.mark.data
def test_smollm2_streamed_equals_in_memory(tmp_path):
    """SmolLM2-135M: 30 blocks of real weights, SparseGPT 50% on 4 x 128 WikiText-2 tokens;
    the streamed folder loads back with its tokenizer through prunekit."""
    from prunekit import models
    from prunekit.models.llm import save_pretrained

    dense = models.create("smollm2-135m", pretrained=True)
    save_pretrained(dense, tmp_path / "src")
    calib = models.calibration_batches("smollm2-135m", n=4, seq_len=128, seed=0,
                                       tokenizer=dense.tokenizer, batch_size=1)
    config = CONFIGS["sparsegpt-50%"]
    prunekit.prune(dense, config, calib, progress=False)
    report = prune_folder(tmp_path / "src", tmp_path / "out", config, calib)
    assert len(report.layers) == 210 and report.sparsity == pytest.approx(0.5, abs=1e-3)
    got = models.from_pretrained(tmp_path / "out")
    assert got.tokenizer is not None
    assert_same_model(got, dense)
