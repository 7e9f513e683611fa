"""Language models from files (fast tier): a GGUF written here from the tiny random Llama
converts back to the same model; perplexity windows and calibration segments; bad input."""

import math

import numpy as np
import pytest
import torch

from prunekit import models
from prunekit.data import calibration_segments, lm_text, wikitext2_test_rows
from prunekit.errors import PruneError
from prunekit.evaluate import lm_perplexity, lm_windows
from prunekit.models.llm import from_gguf, from_pretrained, unpermute_rope

gguf = pytest.importorskip("gguf")


def _byte_symbols():
    """GPT-2's byte-to-unicode table: the symbols a byte-level BPE vocabulary is written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def _permute(w, heads):
    """llama.cpp's converter: each head's rotary halves interleaved (HF -> GGUF)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2) \
        .reshape(w.shape)


_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(model, path, arch="llama", quantize=("ffn_up",)):
    """The tiny Llama as llama.cpp would write it: q/k rows permuted, a byte-level
    vocabulary, the named tensors in Q8_0 and the rest in float32."""
    from gguf import GGMLQuantizationType, quants

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    symbols = _byte_symbols()
    w.add_tokenizer_model("gpt2")
    w.add_token_list([symbols[i] for i in range(c.vocab_size)])
    w.add_token_types([1] * c.vocab_size)
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    expected = {}
    for k, v in model.state_dict().items():
        base = k.removesuffix(".weight")
        top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
               "lm_head": "output"}
        if base in top:
            name = top[base]
        else:
            _, _, i, rest = base.split(".", 3)
            name = f"blk.{i}.{_GGUF_NAMES[rest]}"
        a = v.numpy().copy()
        if name.endswith("attn_q"):
            a = _permute(a, c.num_attention_heads)
        elif name.endswith("attn_k"):
            a = _permute(a, c.num_key_value_heads)
        if name.split(".")[-1] in quantize:
            q = quants.quantize(a, GGMLQuantizationType.Q8_0)
            w.add_tensor(name + ".weight", q, raw_dtype=GGMLQuantizationType.Q8_0)
            expected[k] = torch.from_numpy(
                quants.dequantize(q, GGMLQuantizationType.Q8_0).reshape(v.shape))
        else:
            w.add_tensor(name + ".weight", a)
            expected[k] = v
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny_gguf(tmp_path, cache):
    model = models.create("tiny-llama")
    path = tmp_path / "tiny.gguf"
    return model, path, write_gguf(model, path)


def test_unpermute_rope_inverts_llama_cpp():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert np.array_equal(unpermute_rope(_permute(w, 8), 8), w)
    # llama.cpp interleaves: row 2j of a head is HF row j, row 2j+1 is HF row j + hd/2
    p = _permute(w, 8)
    assert np.array_equal(p[2], w[1]) and np.array_equal(p[3], w[9])


def test_gguf_converts_back_to_the_model(tiny_gguf, cache):
    model, path, expected = tiny_gguf
    got = from_gguf(path)
    state = got.state_dict()
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k  # float32 exact, Q8_0 as dequantized
    model.load_state_dict(expected)
    ids = torch.tensor([[72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]])
    with torch.no_grad():
        assert torch.equal(got(ids).logits, model(ids).logits)
    # the byte-level vocabulary gives the tiny model's own byte ids
    text = "Hello, world! 123"
    assert got.tokenizer(text)["input_ids"] == model.tokenizer(text)["input_ids"]
    # converted once into the cache; the second load reads the folder
    folders = list((cache / "models").iterdir())
    assert len(folders) == 1 and (folders[0] / "model.safetensors").exists()
    again = models.load_model(str(path))
    assert torch.equal(again.lm_head.weight, got.lm_head.weight)
    assert len(list((cache / "models").iterdir())) == 1


def test_gguf_bad_input(tiny_gguf, tmp_path, cache):
    model, path, _ = tiny_gguf
    other = tmp_path / "gpt2.gguf"
    write_gguf(model, other, arch="gpt2")
    with pytest.raises(PruneError, match="architecture 'gpt2' is not supported"):
        from_gguf(other)
    data = path.read_bytes()
    for keep in (len(data) - 1000, 200, 10):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(PruneError, match="truncated|not a readable GGUF"):
            from_gguf(cut)
    with pytest.raises(PruneError, match="does not exist"):
        from_gguf(tmp_path / "missing.gguf")
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())


def test_folder_loader_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PruneError, match="no config.json"):
        from_pretrained(tmp_path / "empty")
    with pytest.raises(PruneError, match="does not exist"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(PruneError, match="does not exist"):
        models.load_model(str(tmp_path / "nope"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(PruneError, match="not a .gguf"):
        models.load_model(str(tmp_path / "w.bin"))


def test_folder_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    from prunekit.models.llm import save_pretrained

    model = models.create("tiny-llama")
    save_pretrained(model, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ours = from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)
        assert torch.equal(ours(ids).logits, model(ids).logits)
    # saving again replaces the model folder whole; a folder of other files is refused
    other = models.create("tiny-llama", seed=1)
    save_pretrained(other, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path / "m")(ids).logits, other(ids).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no leftovers beside it
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(PruneError, match="not a model folder"):
        save_pretrained(model, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def _hand_perplexity(model, ids, L, picks):
    """exp(mean loss), each window scored by transformers' own shifted loss (labels=)."""
    losses = []
    with torch.no_grad():
        for i in picks:
            w = ids[i * L:(i + 1) * L][None]
            losses.append(float(model(input_ids=w, labels=w).loss))
    return math.exp(sum(losses) / len(losses))


def test_lm_perplexity_equals_hand_computation():
    model = models.create("tiny-llama")
    ids = torch.randint(0, 128, (1000,), generator=torch.Generator().manual_seed(1))
    L = 64
    n = 1000 // L  # 15 whole windows; the last 40 tokens are dropped
    assert lm_windows(ids, L).shape == (n, L)
    assert lm_perplexity(model, ids, L) == pytest.approx(
        _hand_perplexity(model, ids, L, range(n)), rel=1e-6)
    picks = [i * n // 4 for i in range(4)]
    assert torch.equal(lm_windows(ids, L, 4), torch.stack([ids[i * L:(i + 1) * L]
                                                           for i in picks]))
    assert lm_perplexity(model, ids, L, windows=4, batch_size=3) == pytest.approx(
        _hand_perplexity(model, ids, L, picks), rel=1e-6)
    # windows are scored on their own: a token before a window never changes its loss
    assert lm_perplexity(model, ids[L:], L, windows=1) == pytest.approx(
        _hand_perplexity(model, ids, L, [1]), rel=1e-6)


def test_perplexity_bad_windows():
    model = models.create("tiny-llama")  # 128 positions
    ids = torch.randint(0, 128, (600,))
    with pytest.raises(PruneError, match="longer than the model's context"):
        lm_perplexity(model, ids, 256)
    with pytest.raises(PruneError, match="windows must be in 1..4"):
        lm_perplexity(model, ids, 128, windows=5)
    with pytest.raises(PruneError, match="fewer than one window"):
        lm_perplexity(model, ids[:100], 128)


def test_calibration_segments():
    tok = models.create("tiny-llama").tokenizer
    text = "".join(chr(65 + i % 26) for i in range(500))
    batches = calibration_segments(tok, n=5, seq_len=32, seed=3, text=text, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 32), (2, 32), (1, 32)]
    for row in torch.cat([b["input_ids"] for b in batches]):
        start = text.index(tok.decode(row[:8]))
        assert tok.decode(row) == text[start:start + 32]  # consecutive tokens of the text
    again = calibration_segments(tok, n=5, seq_len=32, seed=3, text=text, batch_size=2)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    with pytest.raises(PruneError, match="not more than one segment of 32"):
        calibration_segments(tok, n=5, seq_len=32, text=text[:30])
    with pytest.raises(PruneError, match="calibration source"):
        calibration_segments(tok, source="wikitext2-test")


@pytest.mark.data
def test_wikitext2_test_is_rebuilt_as_the_hf_rows():
    from prunekit.data import load_wikitext2

    rows = wikitext2_test_rows()
    assert len(rows) == 4358  # the row count of wikitext-2-raw-v1's test split
    raw = load_wikitext2("test", raw=True).split("\n")[:-1]
    assert [r[:-1] for r in rows if r] == raw and all(r.endswith("\n") for r in rows if r)
    # every heading has an empty row before and after it (the two exceptions that look like
    # headings are formulas inside a paragraph: " = 1 rad / s and a nominal impedance k = ")
    looks = [i for i, r in enumerate(rows) if r.startswith(" = ") and r.endswith(" = \n")]
    alone = [i for i in looks if rows[i - 1] == "" and rows[i + 1] == ""]
    assert len(looks) > 600 and len(looks) - len(alone) == 2
    assert lm_text("wikitext2", "test") == "\n\n".join(rows)
    full = lm_text("tinyshakespeare", "train") + lm_text("tinyshakespeare", "test")
    assert len(full) == 1_115_394 and len(lm_text("tinyshakespeare", "test")) == 111_540


def test_owl_budget_follows_outlier_ratios():
    from prunekit.budget import BUDGETS, outlier_ratios, owl
    from prunekit.layers import find_layers

    model = models.create("tiny-llama", num_hidden_layers=4)
    with torch.no_grad():  # block 2 gets a few huge weights: the most outliers
        model.model.layers[2].mlp.down_proj.weight[:, :3] *= 40
    calib = [torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))]
    layers = find_layers(model, exclude=("lm_head",))
    head_calls = []
    hook = model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    ratios = outlier_ratios(model, layers, calib, m=5.0)
    hook.remove()
    assert not head_calls  # the pass stops after the last block: no logits are computed
    # by hand for block 2: Wanda scores of its 7 layers, share above 5x their mean
    norms = {}
    hooks = [mod.register_forward_pre_hook(
        lambda mod, a, n=n: norms.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).norm(dim=0)))
        for n, mod in layers.items()]
    with torch.no_grad():
        model(calib[0])
    for h in hooks:
        h.remove()
    for b in ratios:
        s = torch.cat([(m.weight.abs() * norms[n]).reshape(-1) for n, m in layers.items()
                       if n.startswith(b + ".")])
        assert ratios[b] == pytest.approx(float((s > 5 * s.mean()).float().mean()), rel=1e-4)
    assert len(set(ratios.values())) == 4
    budget = owl(layers, 0.6, model=model, calib=calib, lam=0.1)
    assert BUDGETS.get("owl") is owl and set(budget) == set(layers)
    per_block = {b: budget[f"{b}.mlp.up_proj"] for b in ratios}
    # linear in the outlier ratio: more outliers, lower sparsity; the spread is 2 * lam
    order = sorted(ratios, key=ratios.get)
    assert [per_block[b] for b in order] == sorted(per_block.values(), reverse=True)
    r0, r1 = ratios[order[0]], ratios[order[-1]]
    for b in ratios:
        assert per_block[b] - per_block[order[0]] == pytest.approx(
            -0.2 * (ratios[b] - r0) / (r1 - r0))
    assert sum(per_block.values()) / 4 == pytest.approx(0.6)
    assert all(budget[n] == per_block[n.rsplit(".", 2)[0]] for n in layers)
    report = prunekit_prune(model, budget, calib)
    assert report.sparsity == pytest.approx(0.6, abs=3e-3)  # rounding per row of 64 inputs
    with pytest.raises(PruneError, match="pass model= and calib="):
        owl(layers, 0.6)
    with pytest.raises(PruneError, match="smaller lam"):
        owl(layers, 0.95, ratios=ratios, lam=0.1)


def prunekit_prune(model, budget, calib):
    import prunekit
    return prunekit.prune(model, prunekit.Wanda(exclude=("lm_head",)), calib, budget=budget,
                          progress=False)


@pytest.mark.data
def test_cli_prunes_and_evaluates_a_gguf_path(tiny_gguf, tmp_path, capsys):
    import json

    from prunekit.cli import main

    _, path, _ = tiny_gguf
    out = tmp_path / "pruned"
    assert main(["prune", str(path), "--method", "sparsegpt", "--pattern", "2:4",
                 "--calib-samples", "4", "--calib-tokens", "32", "--out", str(out), "--json",
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["options"]["exclude"] == ["lm_head"] and report["options"]["sequential"]
    assert len(report["layers"]) == 14 and report["sparsity"] == pytest.approx(0.5)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert main(["eval", str(out), "--windows", "2", "--seq-len", "64", "--json",
                 "--quiet"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["seq_len"] == 64 and got["windows"] == 2 and got["perplexity"] > 1
    assert main(["eval", str(out), "--seq-len", "4096", "--quiet"]) == 2
    assert "longer than the model's context (128 positions)" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing.gguf"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
