"""LoRAP pipeline on transformers Llama models: rank allocation, hooks, structural equivalence with
the dense transformers model, parameter accounting, refusals, and SmolLM2 perplexity."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

from lolakernels.compress import activation_stats
from lolakernels.compress.lorap_pipeline import (
    ATTENTION_PROJECTIONS,
    attention_ranks,
    decoder_layers,
    lorap,
    mlp_channel_importance,
    projection_names,
)
from lolakernels.models import tiny_llama

lorap_module = importlib.import_module("lolakernels.compress.lorap_pipeline")


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(0, 512, (6, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def probe():
    return torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(2))


def square_shapes(d=4096):
    return {name: (d, d) for name in ATTENTION_PROJECTIONS}


# ----------------------------------------------------------------------------------------------
# rank allocation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio,para_allocate", [(0.5, 1.0), (0.6, 2.0), (0.7, 3.0), (0.5, 0.5)])
def test_attention_ranks_split_the_budget(ratio, para_allocate):
    shapes = square_shapes()
    ranks = attention_ranks(shapes, ratio, para_allocate)
    assert ranks["q_proj"] == ranks["k_proj"] and ranks["v_proj"] == ranks["o_proj"]
    kept_qk = 2 * ranks["q_proj"] * 8192
    kept_vo = 2 * ranks["v_proj"] * 8192
    total = 4 * 4096 * 4096
    assert abs((kept_qk + kept_vo) - (1 - ratio) * total) <= 4 * 8192  # rank rounding only
    assert kept_vo / kept_qk == pytest.approx(para_allocate, rel=0.01)


def test_attention_ranks_keep_dense_what_factors_would_enlarge():
    # SmolLM2's GQA shapes at ratio 0.2: (v, o) would need ranks past break-even, stay dense,
    # and hand their unused budget to (q, k).
    shapes = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576)}
    ranks = attention_ranks(shapes, 0.2, 3.0)
    assert ranks["v_proj"] is None and ranks["o_proj"] is None
    kept = sum(d_out * d_in for name, (d_out, d_in) in shapes.items() if ranks[name] is None)
    kept += sum(ranks[name] * sum(shapes[name]) for name in ("q_proj", "k_proj"))
    total = sum(d_out * d_in for d_out, d_in in shapes.values())
    assert 0.8 * total - 1920 < kept <= 0.8 * total
    # Square (LLaMA-7B-like) layers at ratio 0.2: (v, o) would exceed break-even as well.
    square = attention_ranks(square_shapes(), 0.2, 3.0)
    assert square["v_proj"] is None and square["q_proj"] == int((0.8 * 4 - 2) * 4096 * 4096 // 16384)
    # Whatever the ratio, the kept parameters meet the budget to within one rank's rounding.
    for ratio in (0.01, 0.1, 0.3, 0.6, 0.9):
        ranks = attention_ranks(shapes, ratio, 3.0)
        kept = sum(d_out * d_in if ranks[name] is None else ranks[name] * (d_out + d_in)
                   for name, (d_out, d_in) in shapes.items())
        assert (1 - ratio) * total - 2 * 1920 < kept <= (1 - ratio) * total, ratio


# ----------------------------------------------------------------------------------------------
# activation statistics
# ----------------------------------------------------------------------------------------------

def test_hooks_keep_running_sums_that_match_the_inputs(tiny, calibration):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    seen = {name: [] for name in names}
    modules = dict(tiny.named_modules())
    handles = [modules[name].register_forward_pre_hook(lambda m, args, _n=name: seen[_n].append(args[0].detach()))
               for name in names]
    try:
        stats = activation_stats.collect(tiny, calibration, names, batch_size=4)
    finally:
        for handle in handles:
            handle.remove()
    for name in names:
        inputs = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[name]]).double()
        assert stats[name].tokens == calibration.numel()
        torch.testing.assert_close(stats[name].rms(), inputs.square().mean(0).sqrt().float())
        torch.testing.assert_close(stats[name].norm(), inputs.norm(dim=0).float())
        assert stats[name].sum_squares.shape == (inputs.shape[1],)  # running sums only
    assert all(not module._forward_pre_hooks for module in tiny.modules())


def test_recording_refuses_a_non_linear(tiny):
    with pytest.raises(TypeError, match="model.layers.0.mlp"), activation_stats.recording(tiny, ["model.layers.0.mlp"]):
        pass


# ----------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------

def dense_equivalent(original: nn.Module, compressed: nn.Module) -> nn.Module:
    """The uncompressed transformers model with every compressed projection written back densely:
    L·R for factorized layers, zero rows/columns for pruned MLP channels."""
    model = copy.deepcopy(original)
    for layer, small in zip(decoder_layers(model), compressed.model.layers):
        for owner, names in (("self_attn", ATTENTION_PROJECTIONS), ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                dense = getattr(getattr(layer, owner), name)
                replacement = getattr(getattr(small, owner), name)
                if isinstance(replacement, nn.Sequential):
                    dense.weight.data = replacement[1].weight.data @ replacement[0].weight.data
        mlp, small_mlp = layer.mlp, small.mlp
        if isinstance(small_mlp.gate_proj, nn.Linear) and small_mlp.gate_proj.out_features < mlp.gate_proj.out_features:
            kept = torch.zeros(mlp.gate_proj.out_features, dtype=torch.bool)
            # Recover the kept channels by matching rows of the pruned gate projection.
            for row in small_mlp.gate_proj.weight.data:
                kept |= (mlp.gate_proj.weight.data == row).all(dim=1)
            assert int(kept.sum()) == small_mlp.gate_proj.out_features
            mlp.gate_proj.weight.data[~kept] = 0
            mlp.up_proj.weight.data[~kept] = 0
            mlp.down_proj.weight.data[:, ~kept] = 0
    return model


@pytest.mark.parametrize("mlp", ["prune", "decompose"])
@pytest.mark.parametrize("deco", ["awsvd", "svd"])
@pytest.mark.parametrize("ratio", [0.2, 0.45])
def test_lorap_matches_the_dense_transformers_model(tiny, calibration, probe, mlp, deco, ratio):
    compressed, report = lorap(copy.deepcopy(tiny), calibration, ratio, mlp=mlp, deco=deco, progress=False)
    with torch.no_grad():
        expected = dense_equivalent(tiny, compressed)(probe).logits
        got = compressed(probe).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # Parameter accounting: the report adds up and the parameters really are gone.
    assert report.decoder_params_after == sum(p.numel() for p in compressed.model.layers.parameters())
    assert report.decoder_params_before == sum(p.numel() for p in tiny.model.layers.parameters())
    assert report.achieved_ratio == pytest.approx(ratio, abs=0.03)
    assert sum(row.params_before - row.params_after for row in report.modules) == (
        report.decoder_params_before - report.decoder_params_after)
    kinds = {row.kind for row in report.modules}
    assert ("pruned" in kinds) == (mlp == "prune") and "low-rank" in kinds
    for row in report.modules:
        module = dict(compressed.named_modules())[row.name]
        if row.kind == "low-rank":
            assert isinstance(module, nn.Sequential) and [type(m) for m in module] == [nn.Linear, nn.Linear]
            assert module[0].out_features == row.size
        assert sum(p.numel() for p in module.parameters()) == row.params_after
    assert "Decoder layers" in report.table()


def test_lorap_awsvd_beats_svd_on_the_calibration_distribution(tiny, calibration):
    # Give the tiny model LLM-like outlier channels in its hidden states.
    model = copy.deepcopy(tiny)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[::9] *= 20
    reference = model(calibration).logits
    errors = {}
    for deco in ("awsvd", "svd"):
        compressed, _ = lorap(copy.deepcopy(model), calibration, 0.3, deco=deco, progress=False)
        errors[deco] = (compressed(calibration).logits - reference).norm() / reference.norm()
    assert errors["awsvd"] < errors["svd"], errors


def test_lorap_reuses_statistics(tiny, calibration, probe):
    statistics = activation_stats.collect(tiny, calibration, projection_names(tiny))
    first, _ = lorap(copy.deepcopy(tiny), calibration, 0.3, progress=False)
    second, _ = lorap(copy.deepcopy(tiny), None, 0.3, progress=False, statistics=statistics)
    with torch.no_grad():
        torch.testing.assert_close(first(probe).logits, second(probe).logits)


def test_mlp_importance_prefers_active_heavy_channels():
    mlp = tiny_llama().model.layers[0].mlp
    hidden_norm = torch.ones(mlp.gate_proj.out_features)
    hidden_norm[7] = 1e4
    score = mlp_channel_importance(mlp, torch.ones(mlp.gate_proj.in_features), hidden_norm)
    assert int(score.argmax()) == 7


@pytest.mark.parametrize("change,exception,needle", [
    (dict(ratio=0.0), ValueError, "ratio"),
    (dict(ratio=1.0), ValueError, "ratio"),
    (dict(ratio="0.2"), ValueError, "ratio"),
    (dict(para_allocate=0), ValueError, "para_allocate"),
    (dict(mlp="drop"), ValueError, "mlp"),
    (dict(deco="pca"), ValueError, "deco"),
    (dict(calib_input_ids=[[1, 2, 3]]), TypeError, "calib_input_ids"),
    (dict(calib_input_ids=torch.ones(5, dtype=torch.long)), ValueError, "calib_input_ids"),
    (dict(calib_input_ids=torch.ones(2, 5)), TypeError, "calib_input_ids"),
    (dict(model=nn.Linear(4, 4)), TypeError, "model"),
    (dict(calib_input_ids=None, statistics=activation_stats.ActivationStats()), ValueError, "statistics"),
])
def test_lorap_rejects_bad_arguments(tiny, calibration, change, exception, needle):
    arguments = dict(model=copy.deepcopy(tiny), calib_input_ids=calibration, ratio=0.2)
    arguments.update(change)
    with pytest.raises(exception, match=needle):
        lorap(arguments.pop("model"), arguments.pop("calib_input_ids"), arguments.pop("ratio"), progress=False,
              **arguments)


def test_lorap_refuses_an_already_compressed_model(tiny, calibration):
    compressed, _ = lorap(copy.deepcopy(tiny), calibration, 0.3, progress=False)
    with pytest.raises(TypeError, match="model layer 0"):
        lorap(compressed, calibration, 0.3, progress=False)


def test_package_export(tiny, calibration):
    import lolakernels.compress

    _, report = lolakernels.compress.lorap(copy.deepcopy(tiny), calibration, 0.2, progress=False)
    assert report.achieved_ratio > 0.15


# ----------------------------------------------------------------------------------------------
# the real model
# ----------------------------------------------------------------------------------------------

def test_smollm2_awsvd_keeps_perplexity_below_plain_svd(smollm2, smollm2_tokenizer):
    from lolakernels.benchmarking.perplexity import perplexity, split_text

    split = split_text(smollm2_tokenizer, seq_len=64, calibration_sequences=4, heldout_sequences=2)
    base = perplexity(smollm2, split.heldout)
    statistics = activation_stats.collect(smollm2, split.calibration, projection_names(smollm2))
    results = {}
    for deco in ("awsvd", "svd"):
        compressed, report = lorap(copy.deepcopy(smollm2), None, 0.2, deco=deco, progress=False,
                                   statistics=statistics)
        assert report.achieved_ratio == pytest.approx(0.2, abs=0.005)
        results[deco] = perplexity(compressed, split.heldout)
    assert base < results["awsvd"] < results["svd"], (base, results)
    assert results["awsvd"] < 3 * base
