"""SmolLM2-135M-Instruct end to end (real weights: the `data` marker; the pruning checks are
slow): the GGUF loader against transformers' own, perplexity on fixed windows by hand, every
method's pattern on every block linear layer, SparseGPT and Wanda against magnitude, OWL, and
saving the pruned model the way LLM users load it."""

import math

import pytest
import torch

import prunekit
from prunekit import models
from prunekit.budget import owl, uniform
from prunekit.data import lm_tokens
from prunekit.evaluate import lm_perplexity
from prunekit.layers import find_layers
from prunekit.models import calibration_batches
from prunekit.oneshot import Magnitude, SparseGPT, Wanda

pytestmark = [pytest.mark.data, pytest.mark.usefixtures("one_thread")]
HEAD = ("lm_head",)  # tied to the embeddings: both stay dense


@pytest.fixture(scope="module")
def dense():
    return models.create("smollm2-135m", pretrained=True)


@pytest.fixture(scope="module")
def calib(dense):
    return calibration_batches("smollm2-135m", n=4, seq_len=256, tokenizer=dense.tokenizer)


@pytest.fixture(scope="module")
def test_ids(dense):
    return lm_tokens(dense.tokenizer, "wikitext2", "test")


def _copy(model):
    import copy
    return copy.deepcopy(model)


@pytest.mark.slow
def test_gguf_loader_matches_transformers(dense):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    from prunekit.models.llm import smollm2_gguf

    path = smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                               dtype=torch.float32).eval()
    ours, theirs = dense.state_dict(), ref.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = dense.tokenizer("The capital of France is Paris. The capital of Germany is",
                          return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = dense(ids).logits
        assert torch.equal(logits, ref(ids).logits)
    assert dense.tokenizer.decode(logits[0, -1].argmax()).strip() == "Berlin"
    cfg = dense.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == \
        (30, 576, 1536, 9, 3, 49152)
    assert dense.lm_head.weight.data_ptr() == dense.model.embed_tokens.weight.data_ptr()


def test_dense_perplexity_equals_hand_computation(dense, test_ids):
    L, n = 512, len(test_ids) // 512
    picks = [i * n // 3 for i in range(3)]
    losses = []
    with torch.no_grad():
        for i in picks:
            w = test_ids[i * L:(i + 1) * L][None]
            losses.append(float(dense(input_ids=w, labels=w).loss))
    hand = math.exp(sum(losses) / len(losses))
    assert lm_perplexity(dense, test_ids, L, windows=3) == pytest.approx(hand, rel=1e-5)
    assert 10 < hand < 40  # a 135M model on WikiText-2


def _obeys(model, dense_model, pattern: str, sparsity: float):
    """Every block linear layer carries the pattern's zeros: N:M groups (rows for
    unstructured) have the required zeros, and any zero beyond them was zero in the dense
    model already (the 4-bit grid has exact zeros, which a kept weight may be)."""
    dense_layers = find_layers(dense_model, exclude=HEAD)
    for name, module in find_layers(model, exclude=HEAD).items():
        w, d = module.weight.detach(), dense_layers[name].weight.detach()
        if pattern[0].isdigit():  # N:M
            n, m = map(int, pattern.split(":"))
            z = (w == 0).reshape(w.shape[0], -1, m).sum(2)
            dz = (d == 0).reshape(w.shape[0], -1, m).sum(2)
            need = m - n
        elif pattern == "unstructured:row":
            z, dz = (w == 0).sum(1), (d == 0).sum(1)
            need = round(sparsity * w.shape[1])
        else:
            z, dz = (w == 0).sum(), (d == 0).sum()
            need = round(sparsity * w.numel())
        assert bool((z >= need).all()) and bool((z - need <= dz).all()), name


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["50%", "2:4", "4:8"])
def test_methods_obey_patterns_and_beat_magnitude(dense, calib, test_ids, setting):
    """Every method's mask obeys its pattern on all 210 block linear layers; at 50% and 2:4,
    SparseGPT's and Wanda's perplexity (2 windows of 512 tokens) lie below magnitude's. At
    4:8 SparseGPT alone (the pattern code is the one every method shares)."""
    s, pattern = (0.5, "unstructured") if setting == "50%" else (None, setting)
    ppl = {}
    configs = (Magnitude(pattern=pattern, sparsity=s, exclude=HEAD),
               Wanda(pattern="unstructured:row" if s else pattern, sparsity=s, exclude=HEAD,
                     sequential=True),
               SparseGPT(pattern=pattern, sparsity=s, exclude=HEAD, sequential=True))
    for cfg in configs[2:] if setting == "4:8" else configs:
        model = _copy(dense)
        report = prunekit.prune(model, cfg, calib, progress=False)
        assert len(report.layers) == 30 * 7
        _obeys(model, dense, cfg.pattern, cfg.target_sparsity)
        assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)
        if setting != "4:8":
            ppl[cfg.name] = lm_perplexity(model, test_ids, 512, windows=2)
    if ppl:
        assert ppl["sparsegpt"] < ppl["magnitude"] and ppl["wanda"] < ppl["magnitude"], ppl


@pytest.mark.slow
def test_owl_spreads_sparsity_by_outliers(dense, calib):
    layers = find_layers(dense, exclude=HEAD)
    budget = owl(layers, 0.7, model=dense, calib=calib)
    per_block = {}
    for name, s in budget.items():
        per_block.setdefault(name.split(".")[2], set()).add(s)
    assert len(per_block) == 30 and all(len(v) == 1 for v in per_block.values())
    values = [next(iter(v)) for v in per_block.values()]
    assert sum(values) / 30 == pytest.approx(0.7)
    assert max(values) - min(values) == pytest.approx(0.16)  # 2 * lam
    model = _copy(dense)
    report = prunekit.prune(model, Wanda(exclude=HEAD), calib, budget=budget, progress=False)
    assert report.sparsity == pytest.approx(0.7, abs=1e-4)
    assert uniform(layers, 0.7) == {n: 0.7 for n in layers}


@pytest.mark.slow
def test_pruned_model_saves_for_transformers(dense, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    from prunekit.models.llm import save_pretrained
    from prunekit.runtime.export import load_compressed, save_compressed

    model = _copy(dense)
    prunekit.prune(model, SparseGPT(pattern="2:4", exclude=HEAD, sequential=True), calib[:1],
                   progress=False)
    save_pretrained(model, tmp_path / "pruned")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    ids = calib[0]["input_ids"][:2, :64]
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tmp_path / "pruned")
    assert tok("Hello world")["input_ids"] == dense.tokenizer("Hello world")["input_ids"]
    info = save_compressed(model, tmp_path / "pruned.safetensors")
    assert info["ratio"] > 1.3
    state = load_compressed(tmp_path / "pruned.safetensors")
    again = _copy(dense)
    again.load_state_dict(state, strict=False)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
