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
    LLMShrink,
    collect_stats,
    load_llm,
    save_llm,
    shrink_llm,
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
