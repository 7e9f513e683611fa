"""structured.llm: width (query heads within key/value groups, whole groups, MLP neurons,
hidden channels) and depth pruning of Llama-architecture LMs, saving, distillation, CLI.

The fast tier uses tiny-llama configured for grouped-query attention (8 query heads over 2
key/value heads, 4 blocks); the shrunk model must compute exactly what the original computes
with the removed units zeroed (o_proj columns of removed heads, down_proj columns of removed
neurons, every writer of a removed residual channel, the output projections of dropped
blocks).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from prunekit.errors import PruneError
from prunekit.structured.distill import distill, distill_loss
from prunekit.structured.llm import (
    IMPORTANCES,
    LLMShrink,
    collect_stats,
    load_llm,
    mlp_widths,
    removal_error,
    save_llm,
    shrink_llm,
    taylor_scores,
    unit_scores,
)

VOCAB = 128


def tiny(layers=4):
    from prunekit.models import create
    return create("tiny-llama", num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=2, seed=1)


def calib(seed=0, batches=2):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=g)}
            for _ in range(batches)]


X = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


def masked(model, plan):
    """The original with everything the plan removes zeroed (written here, not by llm.py)."""
    m = copy.deepcopy(model)
    d = m.model.embed_tokens.embedding_dim
    drop_c = [c for c in range(d) if c not in plan.hidden]
    with torch.no_grad():
        m.model.embed_tokens.weight[:, drop_c] = 0
        for i, layer in enumerate(m.model.layers):
            a, mlp = layer.self_attn, layer.mlp
            if i not in plan.blocks:
                a.o_proj.weight.zero_()
                mlp.down_proj.weight.zero_()
                continue
            hd = a.head_dim
            for h in range(a.q_proj.out_features // hd):
                if h not in plan.heads[i]:
                    a.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            drop_n = [j for j in range(mlp.down_proj.in_features) if j not in plan.neurons[i]]
            mlp.down_proj.weight[:, drop_n] = 0
            a.o_proj.weight[drop_c] = 0
            mlp.down_proj.weight[drop_c] = 0
    return m


def logits(model, ids=X):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


EXACT = dict(reconstruct="none")  # the kept weights unchanged: equal to the masked model
CONFIGS = {
    "heads-in-groups": LLMShrink(heads=4, **EXACT),
    "kv-groups": LLMShrink(kv_heads=1, **EXACT),
    "mlp": LLMShrink(mlp_ratio=0.4, **EXACT),
    "hidden": LLMShrink(hidden_ratio=0.625, **EXACT),
    "depth": LLMShrink(drop_blocks=2, **EXACT),
    "all": LLMShrink(heads=2, kv_heads=1, mlp_ratio=0.5, hidden_ratio=0.75, drop_blocks=1,
                     round_to=4, **EXACT),
}


@pytest.mark.parametrize("key", list(CONFIGS))
def test_shrunk_equals_masked_and_attention_stays_valid(key):
    model = tiny()
    cfg = CONFIGS[key]
    small, report = shrink_llm(model, cfg, calib())
    plan = small.prune_plan
    assert torch.allclose(logits(small), logits(masked(model, plan)), atol=2e-5, rtol=1e-4)
    assert report.params_after < report.params_before
    for b, layer in enumerate(small.model.layers):
        a = layer.self_attn
        assert a.head_dim == 8  # unchanged
        hq, hkv = a.q_proj.out_features // 8, a.k_proj.out_features // 8
        assert hq % hkv == 0 and a.num_key_value_groups == hq // hkv
        assert a.v_proj.out_features == a.k_proj.out_features
        assert a.o_proj.in_features == a.q_proj.out_features
        assert a.layer_idx == b
        # the kept query heads are served by the kept key/value heads, same count each
        kv, heads = plan.kv_heads[plan.blocks[b]], plan.heads[plan.blocks[b]]
        assert [h // 4 for h in heads] == sorted(g for g in kv for _ in range(hq // hkv))
    c = small.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers) == (
        report.heads[0], report.kv_heads[0], len(small.model.layers))
    # the KV cache (renumbered blocks, fewer heads) gives what the full forward gives
    with torch.no_grad():
        full = small(input_ids=X[:1]).logits
        out = small(input_ids=X[:1, :8], use_cache=True)
        steps = [out.logits]
        past = out.past_key_values
        for t in range(8, 12):
            out = small(input_ids=X[:1, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-4)


def test_scores_match_their_definitions():
    """Head score = energy of the head's o_proj output, neuron score = ||x_i|| ||W_down[:, i]||,
    block influence = 1 - mean cos(block input, block output), by brute force."""
    model = tiny()
    data = calib()
    stats = collect_stats(model, data, grams=False)
    full = collect_stats(model, data)  # the same scores read from the Gram matrices
    for a, b in zip(stats.head + stats.neuron, full.head + full.neuron):
        assert torch.allclose(a, b, rtol=1e-5)
    layer = model.model.layers[1]
    seen = {}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda m, a: seen.setdefault("o", []).append(a[0].reshape(-1, 64))),
        layer.mlp.down_proj.register_forward_pre_hook(
        lambda m, a: seen.setdefault("down", []).append(a[0].reshape(-1, 128)))]
    hs = []
    with torch.no_grad():
        for b in data:
            hs.append(model(**b, use_cache=False, output_hidden_states=True).hidden_states)
    for h in hooks:
        h.remove()
    xo, xd = torch.cat(seen["o"]), torch.cat(seen["down"])
    w = layer.self_attn.o_proj.weight
    want = torch.stack([(xo[:, h * 8:(h + 1) * 8] @ w[:, h * 8:(h + 1) * 8].T).pow(2).sum()
                        for h in range(8)])
    assert torch.allclose(stats.head[1], want, rtol=1e-4)
    want = xd.pow(2).sum(0) * layer.mlp.down_proj.weight.pow(2).sum(0)
    assert torch.allclose(stats.neuron[1], want, rtol=1e-4)
    for i in range(3):  # the last hidden state is after the final norm
        a = torch.cat([h[i].reshape(-1, 64) for h in hs])
        b = torch.cat([h[i + 1].reshape(-1, 64) for h in hs])
        want = float((1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean())
        assert stats.influence[i] == pytest.approx(want, rel=1e-4)
    assert stats.tokens == 64


def test_reconstruction_is_the_least_squares_fit():
    """reconstruct="all" refits o_proj and down_proj on the kept heads and neurons: the
    result equals lstsq on the calibration inputs (damp=0), and the block's output error
    on those inputs is at most the unrefitted (masked) one."""
    model = tiny()
    data = calib(batches=3)
    seen = {}
    layer = model.model.layers[2]
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda m, a: seen.setdefault("down", []).append(a[0].reshape(-1, 128))),
        layer.self_attn.o_proj.register_forward_pre_hook(
        lambda m, a: seen.setdefault("o", []).append(a[0].reshape(-1, 64)))]
    with torch.no_grad():
        for b in data:
            model(**b, use_cache=False)
    for h in hooks:
        h.remove()
    cfg = LLMShrink(heads=4, mlp_ratio=0.25, damp=0.0, reconstruct="all")
    with pytest.warns(UserWarning, match="overfits"):  # 96 tokens for 128 inputs
        small, _ = shrink_llm(model, cfg, data)
    plan = small.prune_plan
    for part, x, keep, new in (
            ("down", torch.cat(seen["down"]).double(), plan.neurons[2],
             small.model.layers[2].mlp.down_proj.weight),
            ("o", torch.cat(seen["o"]).double(),
             [h * 8 + t for h in plan.heads[2] for t in range(8)],
             small.model.layers[2].self_attn.o_proj.weight)):
        w = (layer.mlp.down_proj if part == "down" else layer.self_attn.o_proj).weight.double()
        y = x @ w.T
        want = torch.linalg.lstsq(x[:, keep], y).solution.T
        assert torch.allclose(new.double(), want, atol=1e-4, rtol=1e-3), part
        err_fit = (x[:, keep] @ new.double().T - y).pow(2).sum()
        err_mask = (x[:, keep] @ w[:, keep].T - y).pow(2).sum()
        assert err_fit <= err_mask


def test_depth_cut_removes_exactly_the_named_blocks():
    model = tiny()
    stats = collect_stats(model, calib())
    small, report = shrink_llm(model, LLMShrink(drop_blocks=2), calib(), stats=stats)
    assert collect_stats(model, calib(), grams=False).influence == stats.influence
    lowest = sorted(range(4), key=lambda i: stats.influence[i])[:2]
    assert report.dropped_blocks == sorted(lowest)
    kept = [i for i in range(4) if i not in lowest]
    for j, i in enumerate(kept):
        for (n1, p1), (n2, p2) in zip(small.model.layers[j].named_parameters(),
                                      model.model.layers[i].named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)
    assert small.config.num_hidden_layers == 2 and len(model.model.layers) == 4
    # by perplexity: the block whose removal costs least goes
    _, rep = shrink_llm(model, LLMShrink(drop_blocks=1, block_metric="perplexity"), calib())
    assert rep.dropped_blocks == [min(range(4), key=lambda i: rep.block_scores[i])]


def test_uniform_model_saves_as_a_transformers_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny()
    small, report = shrink_llm(model, CONFIGS["all"], calib())
    assert report.uniform
    folder = save_llm(small, tmp_path / "small")
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
            cfg["intermediate_size"], cfg["hidden_size"], cfg["num_hidden_layers"]) == \
        (2, 1, 8, 64, 48, 3)
    back = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert torch.equal(logits(back), logits(small))


def test_per_block_widths_save_in_prunekit_format(tmp_path):
    model = tiny()
    cfg = LLMShrink(mlp_per_layer=(1.0, 0.5, 0.25, 0.75), heads=4, hidden_ratio=0.75,
                    reconstruct="none")
    small, report = shrink_llm(model, cfg, calib())
    assert not report.uniform and report.mlp == [128, 64, 32, 96]
    with pytest.raises(PruneError, match="one safetensors file"):
        save_llm(small, tmp_path)
    path = save_llm(small, tmp_path / "small.safetensors")
    back = load_llm(path)
    assert [b.mlp.down_proj.in_features for b in back.model.layers] == report.mlp
    assert torch.equal(logits(back), logits(small))


def test_bad_inputs_name_the_module_and_the_fix():
    from prunekit.models import create

    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruneError, match=r"model\.layers\.0\.self_attn: heads=3 .* one of "
                                         r"\[2, 4, 6, 8\]"):
        shrink_llm(model, LLMShrink(heads=3), calib())
    with pytest.raises(PruneError, match=r"heads=5 with 1 key/value heads kept .*\[1, 2, 3, 4\]"):
        shrink_llm(model, LLMShrink(heads=5, kv_heads=1), calib())
    with pytest.raises(PruneError, match="kv_heads=3 cannot keep more"):
        shrink_llm(model, LLMShrink(kv_heads=3), calib())
    with pytest.raises(PruneError, match="every one of the 4 blocks"):
        shrink_llm(model, LLMShrink(drop_blocks=4), calib())
    with pytest.raises(PruneError, match="mlp_ratio"):
        LLMShrink(mlp_ratio=0.0)
    with pytest.raises(PruneError, match="model.layers"):
        shrink_llm(create("tiny-gpt2"), LLMShrink(mlp_ratio=0.5), calib())
    broken = tiny()
    broken.model.layers[2].post_attention_layernorm = torch.nn.LayerNorm(64)
    with pytest.raises(PruneError, match=r"model\.layers\.2\.post_attention_layernorm"):
        shrink_llm(broken, LLMShrink(mlp_ratio=0.5), calib())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_distillation_moves_the_student_towards_the_teacher():
    model = tiny()
    small, _ = shrink_llm(model, LLMShrink(mlp_ratio=0.5, hidden_ratio=0.75, drop_blocks=1,
                                           **EXACT), calib())
    data = calib(seed=3, batches=1)
    with torch.no_grad():
        before = float(distill_loss(logits(small, data[0]["input_ids"]),
                                    logits(model, data[0]["input_ids"])))
    out = distill(small, model, data, steps=15, lr=3e-3, hidden_weight=0.5,
                  kept_hidden=small.prune_plan.hidden)
    with torch.no_grad():
        after = float(distill_loss(logits(small, data[0]["input_ids"]),
                                   logits(model, data[0]["input_ids"])))
    assert after < 0.7 * before and out["steps"] == 15 and not small.training
    with pytest.raises(PruneError, match="kept_hidden"):
        distill(small, model, data, steps=1, hidden_weight=1.0)


def test_cli_shrinks_saves_and_refuses(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from prunekit.cli import main

    out = tmp_path / "small"
    rc = main(["shrink", "tiny-llama", "--heads", "2", "--kv-heads", "1", "--mlp-ratio", "0.5",
               "--drop-blocks", "1", "--distill-steps", "2", "--eval-tokens", "0",
               "--prefill-tokens", "16", "--decode-tokens", "2", "--out", str(out), "--json",
               "--quiet"])
    assert rc == 0
    got = json.loads(capsys.readouterr().out)
    assert got["dropped_blocks"] and got["heads"] == [2] and got["kv_heads"] == [1]
    assert got["distill"]["steps"] == 2 and got["speed"]["pruned"]["prefill_s"] > 0
    back = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in back.parameters()) == got["params_after"]
    assert back.config.num_hidden_layers == 1 and back.config.intermediate_size == 64
    bad = tmp_path / "bad"
    assert main(["shrink", "tiny-llama", "--heads", "3", "--eval-tokens", "0",
                 "--out", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn: heads=3" in err and not bad.exists()
    assert main(["shrink", "tiny-llama", "--drop-blocks", "2", "--flops-ratio", "0.5"]) == 2
    assert "--flops-ratio" in capsys.readouterr().err
    assert main(["shrink", "tiny-bert", "--mlp-ratio", "0.5"]) == 2
    assert "prune causal LMs" in capsys.readouterr().err


# -- importance (activation, taylor, error) and per-block MLP widths by the DP --------------

def test_taylor_scores_match_a_hand_computation_and_leave_the_model_as_it_was():
    """Per batch, (sum of grad * weight over the unit's gate slices)^2, summed over batches:
    a head's o_proj columns, a group's heads' o_proj columns, a neuron's down_proj column, a
    hidden channel's writers (embedding column, every o_proj and down_proj row), from
    loss.backward of the causal-LM loss on a copy. The user's .grad, requires_grad flags and
    per-module train/eval modes are left as they were."""
    model = tiny(layers=2)
    data = calib(batches=2)
    model.train()
    model.model.layers[1].mlp.eval()
    down0 = model.model.layers[0].mlp.down_proj.weight
    sentinel = torch.randn_like(down0)
    down0.grad = sentinel
    model.model.layers[1].self_attn.o_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = taylor_scores(model, data)
    assert down0.grad is sentinel and torch.equal(sentinel, down0.grad.clone())
    assert all(p.grad is None for p in model.parameters() if p is not down0)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(t.requires_grad for t in got.head + got.group + got.neuron + [got.hidden])

    ref = copy.deepcopy(model).eval().requires_grad_(True)
    head = [torch.zeros(8, dtype=torch.float64) for _ in range(2)]
    group = [torch.zeros(2, dtype=torch.float64) for _ in range(2)]
    neuron = [torch.zeros(128, dtype=torch.float64) for _ in range(2)]
    hidden = torch.zeros(64, dtype=torch.float64)
    for b in data:
        ref.zero_grad(set_to_none=True)
        ref(**b, labels=b["input_ids"], use_cache=False).loss.backward()

        def gw(mod):
            return (mod.weight.grad * mod.weight).double()

        wire = gw(ref.model.embed_tokens).sum(0)  # (vocab, hidden): column c
        for i, layer in enumerate(ref.model.layers):
            o, down = gw(layer.self_attn.o_proj), gw(layer.mlp.down_proj)
            h = o.sum(0).reshape(8, 8).sum(1)
            head[i] += h ** 2
            group[i] += h.reshape(2, 4).sum(1) ** 2
            neuron[i] += down.sum(0) ** 2
            wire += o.sum(1) + down.sum(1)
        hidden += wire ** 2
    close = dict(rtol=1e-3, atol=1e-9)
    for i in range(2):
        assert torch.allclose(got.head[i].double(), head[i], **close)
        assert torch.allclose(got.group[i].double(), group[i], **close)
        assert torch.allclose(got.neuron[i].double(), neuron[i], **close)
    assert torch.allclose(got.hidden.double(), hidden, **close)
    # pieces of one sequence give the same batch gradient, so the same scores
    again = taylor_scores(model, data, micro_batch=1)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-9)
               for a, b in zip(again.neuron + again.head + [again.hidden],
                               got.neuron + got.head + [got.hidden]))


def _seen(model, data, mods, what="output"):
    """Every call's input or output of each of `mods` over the calibration batches."""
    seen = {m: [] for m in mods}

    def keep(m, t):
        seen[m].append(t.reshape(-1, t.shape[-1]).double())

    hooks = [m.register_forward_hook(lambda m, a, out: keep(m, out)) if what == "output"
             else m.register_forward_pre_hook(lambda m, a: keep(m, a[0])) for m in mods]
    with torch.no_grad():
        for b in data:
            model(**b, use_cache=False)
    for h in hooks:
        h.remove()
    return {m: torch.cat(v) for m, v in seen.items()}


def test_error_score_is_the_output_change_of_removing_the_unit_alone():
    """importance="error": without the refit, the energy by which a layer's output changes
    on the calibration tokens when only that unit is zeroed (measured by running the
    model); with the refit (damp=0), the least-squares residual of the layer's output when
    the unit's inputs are removed and the other columns refit (lstsq, brute force)."""
    model = tiny(layers=2)
    g = torch.Generator().manual_seed(4)
    data = [{"input_ids": torch.randint(0, VOCAB, (2, 48), generator=g)} for _ in range(2)]
    stats = collect_stats(model, data)  # 192 tokens for down_proj's 128 inputs
    plain = unit_scores(model, LLMShrink(importance="error", reconstruct="none"), stats)
    refit = unit_scores(model, LLMShrink(importance="error", reconstruct="all", damp=0.0),
                        stats)
    names = {"o": "model.layers.1.self_attn.o_proj", "down": "model.layers.1.mlp.down_proj"}
    cases = [("neuron", "down", [j]) for j in (0, 17, 101)] + \
        [("head", "o", list(range(h * 8, h * 8 + 8))) for h in (0, 5)] + \
        [("group", "o", list(range(32, 64)))]
    mods = {k: model.get_submodule(n) for k, n in names.items()}
    base = _seen(model, data, list(mods.values()))
    x_in = _seen(model, data, list(mods.values()), what="input")
    for kind, lin, cols in cases:
        unit = cols[0] // len(cols)
        cut = copy.deepcopy(model)
        with torch.no_grad():
            cut.get_submodule(names[lin]).weight[:, cols] = 0
        out = _seen(cut, data, [cut.get_submodule(names[lin])])
        measured = float((base[mods[lin]] - next(iter(out.values()))).pow(2).sum())
        assert float(getattr(plain, kind)[1][unit]) == pytest.approx(measured, rel=1e-4)
        x = x_in[mods[lin]]
        y = x @ mods[lin].weight.detach().double().T
        keep = [j for j in range(x.shape[1]) if j not in set(cols)]
        fit = torch.linalg.lstsq(x[:, keep], y).solution
        residual = float((x[:, keep] @ fit - y).pow(2).sum())
        assert float(getattr(refit, kind)[1][unit]) == pytest.approx(residual, rel=1e-3)
    # without the refit, a neuron's and a head's error is their activation score
    assert torch.allclose(plain.neuron[1], stats.neuron[1], rtol=1e-5)
    assert torch.allclose(plain.head[1], stats.head[1], rtol=1e-5)
    # a hidden channel: what zeroing it takes from every reader's output (q, k, v, gate, up
    # of every block, lm_head), from the readers' inputs
    readers = [lin for b in model.model.layers for lin in (
        b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj, b.mlp.gate_proj,
        b.mlp.up_proj)] + [model.lm_head]
    xs = _seen(model, data, readers, what="input")
    for c in (3, 40):
        want = sum(float((xs[r][:, c:c + 1] @ r.weight.detach().double()[:, c:c + 1].T)
                         .pow(2).sum()) for r in readers)
        assert float(plain.hidden[c]) == pytest.approx(want, rel=1e-4)


def test_removal_error_equals_brute_force_on_a_small_layer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    x[:, 3] += 0.9 * x[:, 1]  # correlated inputs: the refit recovers part of a removal
    w = torch.randn(3, 6, generator=g, dtype=torch.float64)
    y = x @ w.T
    for size in (1, 2, 3):
        plain = removal_error(w, x.T @ x, size)
        refit = removal_error(w, x.T @ x, size, refit=True, damp=0.0)
        for b in range(6 // size):
            cols = list(range(b * size, (b + 1) * size))
            keep = [j for j in range(6) if j not in cols]
            want = float((x[:, cols] @ w[:, cols].T).pow(2).sum())
            assert float(plain[b]) == pytest.approx(want, rel=1e-9)
            fit = torch.linalg.lstsq(x[:, keep], y).solution
            want = float((x[:, keep] @ fit - y).pow(2).sum())
            assert float(refit[b]) == pytest.approx(want, rel=1e-7)
            assert refit[b] <= plain[b] + 1e-9


def _removed(scores, widths):
    return sum(float(torch.sort(s).values[:len(s) - w].sum()) for s, w in zip(scores, widths))


@pytest.mark.parametrize("ratio,round_to", [(0.5, 2), (0.3, 3), (0.6, 1)])
def test_dp_mlp_widths_are_the_brute_force_optimum(ratio, round_to):
    """Every combination of the allowed widths on 3 blocks: the DP's removes the least
    summed score within uniform's kept total, and never more than uniform."""
    import itertools
    import math

    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(8, generator=g) * scale for scale in (1.0, 5.0, 0.2)]
    got = mlp_widths(scores, ratio, round_to)
    uniform = [min(8, max(round_to, math.ceil(ratio * 8 / round_to - 1e-9) * round_to))] * 3
    step = round_to if round_to > 1 else 64
    options = sorted({8, uniform[0], *range(step, 8, step)})
    best = min(_removed(scores, c) for c in itertools.product(options, repeat=3)
               if sum(c) <= sum(uniform))
    assert sum(got) <= sum(uniform) and all(w in options for w in got)
    assert _removed(scores, got) == pytest.approx(best, abs=1e-9)
    assert _removed(scores, got) <= _removed(scores, uniform) + 1e-9


def test_dp_widths_through_shrink_save_and_reload(tmp_path):
    """mlp_allocation="dp" on the tiny model: per-block widths, at most uniform's MLP
    parameters, no more importance removed than uniform, shrunk equals masked, and the
    prunekit-format file reloads with equal logits."""
    model = tiny()
    with torch.no_grad():  # make the blocks' MLPs unequal, so the DP has a reason to differ
        model.model.layers[0].mlp.down_proj.weight.mul_(4)
        model.model.layers[3].mlp.down_proj.weight.mul_(0.25)
    data = calib()
    stats = collect_stats(model, data)
    cfg = LLMShrink(mlp_ratio=0.5, round_to=16, reconstruct="none")
    small, report = shrink_llm(model, cfg.replace(mlp_allocation="dp"), data, stats=stats)
    flat, uni = shrink_llm(model, cfg, data, stats=stats)
    assert not report.uniform and all(w % 16 == 0 for w in report.mlp)

    def mlp_params(m):
        return sum(p.numel() for b in m.model.layers for p in b.mlp.parameters())

    assert mlp_params(small) <= mlp_params(flat) and sum(report.mlp) <= sum(uni.mlp)

    def removed(plan):
        return sum(float(stats.neuron[i].sum() - stats.neuron[i][plan.neurons[i]].sum())
                   for i in plan.blocks)

    assert removed(small.prune_plan) <= removed(flat.prune_plan)
    assert torch.allclose(logits(small), logits(masked(model, small.prune_plan)), atol=2e-5,
                          rtol=1e-4)
    back = load_llm(save_llm(small, tmp_path / "dp.safetensors"))
    assert [b.mlp.down_proj.in_features for b in back.model.layers] == report.mlp
    assert torch.equal(logits(back), logits(small))


@pytest.mark.parametrize("importance,allocation", [(k, "uniform") for k in IMPORTANCES] +
                         [("error", "dp")])
def test_every_importance_shrinks_to_the_masked_model(importance, allocation):
    model = tiny()
    cfg = LLMShrink(heads=2, kv_heads=1, mlp_ratio=0.5, hidden_ratio=0.75, drop_blocks=1,
                    round_to=16, importance=importance, mlp_allocation=allocation, **EXACT)
    small, report = shrink_llm(model, cfg, calib())
    assert report.config["importance"] == importance
    assert torch.allclose(logits(small), logits(masked(model, small.prune_plan)), atol=2e-5,
                          rtol=1e-4)


def test_bad_importance_and_allocation_name_the_field():
    assert IMPORTANCES == ("activation", "taylor", "error")
    with pytest.raises(PruneError, match=r"LLMShrink\.importance must be one of"):
        LLMShrink(importance="flap")
    with pytest.raises(PruneError, match=r"LLMShrink\.mlp_allocation='dp' .* mlp_ratio < 1"):
        LLMShrink(mlp_allocation="dp")
    with pytest.raises(PruneError, match=r"LLMShrink\.mlp_allocation='dp' .* not mlp_per_la"):
        LLMShrink(mlp_allocation="dp", mlp_ratio=0.5, mlp_per_layer=(0.5,) * 4)
    with pytest.raises(PruneError, match=r"LLMShrink\.mlp_allocation must be one of"):
        LLMShrink(mlp_allocation="greedy")
    model = tiny()
    stats = collect_stats(model, calib(), grams=False)
    with pytest.raises(PruneError, match=r"importance='error' reads the Gram matrices"):
        shrink_llm(model, LLMShrink(mlp_ratio=0.5, importance="error", reconstruct="none"),
                   calib(), stats=stats)


def test_cli_importance_and_mlp_allocation(capsys):
    from prunekit.cli import main

    rc = main(["shrink", "tiny-llama", "--mlp-ratio", "0.5", "--importance", "taylor",
               "--mlp-allocation", "dp", "--round-to", "16", "--reconstruct", "none",
               "--calib-samples", "2",
               "--calib-len", "16", "--eval-tokens", "0", "--prefill-tokens", "8",
               "--decode-tokens", "1", "--json", "--quiet"])
    assert rc == 0
    got = json.loads(capsys.readouterr().out)
    assert got["config"]["importance"] == "taylor" and got["config"]["mlp_allocation"] == "dp"
    assert sum(got["mlp"]) <= 64 * len(got["mlp"])
    assert main(["shrink", "tiny-llama", "--mlp-ratio", "0.5", "--importance", "l1"]) == 2
    assert "--importance l1 is a criterion of the traced graph" in capsys.readouterr().err
    assert main(["shrink", "tiny-llama", "--mlp-ratio", "0.5", "--allocation", "dp"]) == 2
    assert "--mlp-allocation dp" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.data
def test_smollm2_first_blocks(tmp_path, one_thread):
    """SmolLM2's real weights, cut to its first 4 blocks (9 query heads over 3 key/value
    heads): query heads within groups, a whole group, MLP neurons and hidden channels;
    shrunk equals masked, and the transformers folder reloads with equal logits."""
    from transformers import AutoModelForCausalLM

    from prunekit.models import calibration_batches, create

    model = create("smollm2-135m", pretrained=True)
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    data = calibration_batches("smollm2-135m", n=2, seq_len=64, tokenizer=model.tokenizer)
    ids = data[0]["input_ids"][:1, :32]
    cfg = LLMShrink(heads=4, kv_heads=2, mlp_ratio=0.5, hidden_ratio=0.75, drop_blocks=1,
                    reconstruct="none")
    small, report = shrink_llm(model, cfg, data)
    assert report.heads == [4] * 3 and report.kv_heads == [2] * 3 and report.hidden == 432
    ref = logits(masked(model, small.prune_plan), ids)
    assert torch.allclose(logits(small, ids), ref, atol=1e-3 * float(ref.abs().max()))
    folder = save_llm(small, tmp_path / "small")
    back = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert torch.equal(logits(back, ids), logits(small, ids))
