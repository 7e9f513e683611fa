import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import rankdata
from torch import nn

from prunekit import PruneError, models
from prunekit.cli import main
from prunekit.evaluate import (
    evaluate,
    fidelity,
    perplexity,
    reestimate_bn,
    stsb_spearman,
    top1_accuracy,
)


def test_top1_matches_brute_force_for_any_batch_size():
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(12, 5)
    x, y = torch.randn(103, 12, generator=g), torch.randint(0, 5, (103,), generator=g)
    with torch.no_grad():
        expected = 100.0 * sum(int(model(x[i:i + 1]).argmax() == y[i]) for i in range(103)) / 103
    for bs in (1, 7, 256):
        assert top1_accuracy(model, x, y, batch_size=bs) == pytest.approx(expected)
    with pytest.raises(PruneError, match="as many labels"):
        top1_accuracy(model, x, y[:5])


class _LookupEncoder(nn.Module):
    """A 'sentence encoder' whose embedding of sentence i is row i of a table."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return self.table[input_ids[:, 0]]


class _LookupTokenizer:
    def __init__(self, sentences):
        self.index = {s: i for i, s in enumerate(sentences)}

    def __call__(self, batch, return_tensors="pt", **_):
        ids = torch.tensor([[self.index[s]] for s in batch])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_stsb_spearman_is_rank_correlation_of_cosines():
    rng = np.random.default_rng(0)
    sentences = [f"s{i}" for i in range(30)]
    table = torch.from_numpy(rng.normal(size=(30, 8))).float()
    pairs = [(sentences[a], sentences[b], float(rng.uniform(0, 5)))
             for a, b in rng.integers(0, 30, size=(60, 2))]
    e = table.numpy() / np.linalg.norm(table.numpy(), axis=1, keepdims=True)
    cos = [float(e[int(a[1:])] @ e[int(b[1:])]) for a, b, _ in pairs]
    ra, rb = rankdata(cos), rankdata([s for _, _, s in pairs])
    expected = 100 * np.corrcoef(ra, rb)[0, 1]
    model, tok = _LookupEncoder(table), _LookupTokenizer(sentences)
    for bs in (1, 7, 128):
        assert stsb_spearman(model, tok, pairs, batch_size=bs) == pytest.approx(expected, abs=1e-4)
    gold_is_cos = [(a, b, c) for (a, b, _), c in zip(pairs, cos)]
    assert stsb_spearman(model, tok, gold_is_cos) == pytest.approx(100.0)


def _brute_force_nll(model, ids, contexts):
    """Summed next-token loss, predicting token t from ids[contexts[t]:t]."""
    total = 0.0
    with torch.no_grad():
        for t, start in contexts.items():
            logits = model(input_ids=ids[start:t][None]).logits[0, -1]
            total += float(torch.nn.functional.cross_entropy(logits[None], ids[t][None]))
    return total


def test_perplexity_matches_brute_force():
    model = models.create("tiny-gpt2")
    ids = torch.randint(0, 128, (70,), generator=torch.Generator().manual_seed(3))
    L = 16
    # no overlap: token t is predicted from the start of its window (window starts unscored)
    contexts = {t: t - t % L for t in range(1, 70) if t % L}
    expected = math.exp(_brute_force_nll(model, ids, contexts) / len(contexts))
    assert perplexity(model, ids, seq_len=L) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, ids, seq_len=L, batch_size=1) == pytest.approx(expected, rel=1e-5)
    # stride 1: every token after the first window sees the L-1 tokens before it
    contexts = {t: max(0, t - L + 1) for t in range(1, 70)}
    expected = math.exp(_brute_force_nll(model, ids, contexts) / len(contexts))
    assert perplexity(model, ids, seq_len=L, stride=1) == pytest.approx(expected, rel=1e-5)
    text = "The quick brown fox jumps over the lazy dog. " * 3
    as_ids = torch.tensor(model.tokenizer(text)["input_ids"])
    assert perplexity(model, model.tokenizer, text, seq_len=L) == pytest.approx(
        perplexity(model, as_ids, seq_len=L))
    assert perplexity(model, ids, seq_len=L, max_tokens=33) == pytest.approx(
        perplexity(model, ids[:33], seq_len=L))
    with pytest.raises(PruneError, match="stride"):
        perplexity(model, ids, seq_len=L, stride=L + 1)
    with pytest.raises(PruneError, match="at least 2 tokens"):
        perplexity(model, ids[:1])


def test_fidelity_measures_output_distance():
    m = models.create("digits-cnn")
    batches = [torch.rand(4, 1, 8, 8), torch.rand(3, 1, 8, 8)]
    f = fidelity(m, m, batches)
    assert f["rel_output_error"] == 0 and f["embedding_cosine"] == pytest.approx(1.0)
    doubled = models.create("digits-cnn")
    doubled.load_state_dict(m.state_dict())
    with torch.no_grad():
        doubled.fc2.weight.mul_(2)
        doubled.fc2.bias.mul_(2)
    f = fidelity(m, doubled, batches)  # y' = 2y: error ||y||^2 / ||y||^2, same direction
    assert f["rel_output_error"] == pytest.approx(1.0, rel=1e-5)
    assert f["embedding_cosine"] == pytest.approx(1.0, abs=1e-6)
    negated = models.create("digits-cnn")
    negated.load_state_dict(m.state_dict())
    with torch.no_grad():
        negated.fc2.weight.neg_()
        negated.fc2.bias.neg_()
    f = fidelity(m, negated, batches[0])
    assert f["rel_output_error"] == pytest.approx(4.0, rel=1e-5)
    assert f["embedding_cosine"] == pytest.approx(-1.0, abs=1e-6)


def test_fidelity_leaves_out_padded_tokens():
    class Tokens(nn.Module):
        def __init__(self, pad_value):
            super().__init__()
            self.pad_value = pad_value

        def forward(self, input_ids, attention_mask):
            out = input_ids.float()[..., None].repeat(1, 1, 4) + 1
            return torch.where(attention_mask.bool()[..., None], out, self.pad_value)

    batch = {"input_ids": torch.arange(12).view(2, 6),
             "attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6])}
    f = fidelity(Tokens(0.0), Tokens(-7.0), [batch])
    assert f["rel_output_error"] == 0 and f["embedding_cosine"] == pytest.approx(1.0)


def test_reestimate_bn_computes_exact_statistics_and_restores_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.3), nn.Dropout(0.5))
    model.eval()
    model[2].train()  # a mode that must come back unchanged
    x = torch.randn(64, 3, 5, 5) * 3 + 1
    reestimate_bn(model, x, batch_size=16)
    with torch.no_grad():
        h = model[0](x).transpose(0, 1).reshape(4, 4, -1)  # (channel, batch, values)
    torch.testing.assert_close(model[1].running_mean, h.mean(-1).mean(1))
    torch.testing.assert_close(model[1].running_var, h.var(-1, unbiased=True).mean(1))
    assert model[1].momentum == 0.3 and not model[1].training and not model[0].training
    assert model[2].training and not model.training
    with pytest.raises(PruneError, match="at least one batch"):
        reestimate_bn(model, [])


def test_reestimate_bn_recovers_broken_statistics():
    from prunekit.data import calibration_images, cifar10_tensors
    m = models.create("resnet20-cifar10", pretrained=True)
    x, y = cifar10_tensors("test", limit=500)
    for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
        bn.running_mean.add_(1.0)
    broken = top1_accuracy(m, x, y)
    reestimate_bn(m, calibration_images(256, seed=1, augment=True))
    assert not any(mod.training for mod in m.modules())
    assert top1_accuracy(m, x, y) > broken + 20


@pytest.mark.slow
def test_bn_reestimation_needs_the_training_augmentation():
    """The pretrained statistics were learnt on padded, cropped, flipped images: re-estimating
    on plain images costs points even on the dense model, augmented ones do not."""
    from prunekit.data import calibration_images, cifar10_tensors
    x, y = cifar10_tensors("test", limit=2000)
    dense = top1_accuracy(models.create("resnet20-cifar10", pretrained=True), x, y)
    results = {}
    for augment in (False, True):
        m = models.create("resnet20-cifar10", pretrained=True)
        reestimate_bn(m, calibration_images(512, seed=1, augment=augment))
        results[augment] = top1_accuracy(m, x, y)
    assert results[True] >= dense - 1.0
    assert results[False] <= dense - 1.5


def test_evaluate_dispatches_on_the_data_set():
    from prunekit.data import lm_text
    m = models.create("tiny-gpt2")
    got = evaluate(m, "tiny-gpt2", limit=1500)
    # windows of the model's whole context (128 positions), the partial last one dropped
    expected = perplexity(m, m.tokenizer, lm_text("wikitext2", "test"), seq_len=128,
                          max_tokens=1500 // 128 * 128)
    assert got == {"perplexity": pytest.approx(expected)}
    # an untrained model over a 128-symbol alphabet: perplexity near uniform guessing
    assert 64 < got["perplexity"] < 256
    valid = evaluate(m, "tiny-gpt2", split="valid", limit=1500)["perplexity"]
    assert valid != got["perplexity"]
    with pytest.raises(PruneError, match="no split 'train'"):
        evaluate(m, "tiny-gpt2", split="train")
    with pytest.raises(PruneError, match="no standard data set"):
        evaluate(models.create("tiny-bert"), "tiny-bert")
    with pytest.raises(PruneError, match="model.tokenizer"):
        evaluate(models.create("digits-cnn"), dataset="stsb")
    digits = models.create("digits-cnn")
    assert evaluate(digits, "digits-cnn", limit=50) == evaluate(digits, dataset="digits",
                                                                limit=50)


def test_eval_cli(tmp_path, capsys):
    assert main(["eval", "tiny-llama", "--limit", "600", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "tiny-llama" and out["perplexity"] > 1
    assert main(["eval", "tv:resnet18"]) == 2
    assert "no standard data set; give --dataset" in capsys.readouterr().err
    assert main(["eval", "resnet20-cifar10", "--weights", str(tmp_path / "x.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "resnet20-cifar10", "--limit", "300", "--bn-reestimate", "128",
                 "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bn_reestimate"] == 128 and 80 < out["top1"] <= 100
