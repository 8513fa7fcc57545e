"""lolakernels.peft.accelerate with the PEFT features that need their own set-ups (small random
Llama, fast): DoRA and aLoRA stay on PEFT's path with a log line, layer_replication,
add_weighted_adapter (ties / dare / svd), LoRA-GA init, dropout in a training mixed batch, and
a bf16 base with fp32 adapters."""
import copy
import logging

import pytest
import torch

from peft_cases import accelerated, assert_close_relative, lola_layer_count, randomize_adapter

peft = pytest.importorskip("peft")

from lolakernels.models import tiny_llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _ids(batch=4, length=7, seed=0):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def _peft(configs: dict, base=None, b_scale=0.3):
    model = copy.deepcopy(base) if base is not None else tiny_llama()
    peft_model = None
    for index, (name, config) in enumerate(configs.items()):
        if peft_model is None:
            peft_model = peft.get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        randomize_adapter(peft_model, name, index, b_scale)
    peft_model.base_model.set_adapter(next(iter(configs)))
    return peft_model.eval()


def _logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def _compare(model, input_ids, tolerance=1e-5, **kwargs):
    expected = _logits(model, input_ids, **kwargs)
    with accelerated(model):
        got = _logits(model, input_ids, **kwargs)
    assert_close_relative(got, expected, tolerance)
    return got


def test_dora_runs_on_peft_path_with_one_log_line(caplog):
    model = _peft({"plain": peft.LoraConfig(r=4, target_modules=TARGETS),
                   "dora": peft.LoraConfig(r=6, lora_alpha=12, use_dora=True, target_modules=TARGETS)})
    input_ids = _ids()
    with caplog.at_level(logging.INFO, logger="lolakernels.peft"):
        with accelerated(model):
            pass
    assert any("DoraLinearVariant" in r.getMessage() and "PEFT" in r.getMessage() for r in caplog.records)
    model.base_model.set_adapter("dora")
    _compare(model, input_ids)
    model.base_model.set_adapter("plain")
    _compare(model, input_ids, adapter_names=["plain", "__base__", "plain", "__base__"])
    with accelerated(model), pytest.raises(ValueError, match="DoRA"):
        _logits(model, input_ids, adapter_names=["plain", "dora", "plain", "__base__"])


def test_alora_runs_on_peft_path():
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[7, 8])
    model = _peft({"alora": config})
    input_ids = _ids()
    input_ids[:, 2:4] = torch.tensor([7, 8])
    _compare(model, input_ids)


def test_layer_replication():
    config = peft.LoraConfig(r=4, target_modules=TARGETS, layer_replication=[[0, 2], [1, 2]])
    other = peft.LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    model = _peft({"one": config, "two": other})
    assert len(model.base_model.model.model.layers) == 3
    input_ids = _ids()
    _compare(model, input_ids)
    _compare(model, input_ids, adapter_names=["two", "one", "__base__", "two"])


@pytest.mark.parametrize("combination", ["ties", "dare_linear", "svd", "ties_svd", "cat"])
def test_add_weighted_adapter(combination):
    configs = {name: peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS) for name in ("a", "b")}
    model = _peft(configs)
    torch.manual_seed(0)  # dare draws random masks
    extra = {} if combination in ("svd", "cat") else {"density": 0.5}
    model.add_weighted_adapter(["a", "b"], [0.7, 0.5], "merged", combination_type=combination, **extra)
    input_ids = _ids()
    model.base_model.set_adapter("merged")
    _compare(model, input_ids)
    _compare(model, input_ids, adapter_names=["merged", "a", "__base__", "merged"])


def test_lora_ga_initialised_adapter():
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    base = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga",
                             lora_ga_config=LoraGAConfig())
    input_ids = _ids(seed=3)

    def train_step():
        base(input_ids=input_ids, labels=input_ids).loss.backward()

    preprocess_loraga(base, config, train_step)
    model = peft.get_peft_model(base, config, adapter_name="ga").eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["ga"].weight.abs().max() > 0  # LoRA-GA sets both factors
    _compare(model, input_ids)
    _compare(model, input_ids, adapter_names=["ga", "__base__", "ga", "ga"])


def _train_mixed_batch_layer():
    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Linear(24, 20))
    model = None
    for name, dropout in (("x", 0.3), ("y", 0.0), ("z", 0.5)):
        config = peft.LoraConfig(r=3, lora_dropout=dropout, target_modules=["0"], init_lora_weights=False)
        if model is None:
            model = peft.get_peft_model(linear, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model.base_model.model[0].train()


def test_mixed_batch_dropout_in_training_draws_peft_masks():
    layer = _train_mixed_batch_layer()
    for parameter in layer.parameters():
        parameter.requires_grad_(True)
    x = torch.randn(6, 5, 24)
    names = ["z", "x", "__base__", "y", "z", "x"]

    def run():
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        out = layer(x, adapter_names=names)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    expected, expected_grads = run()
    with accelerated(layer):
        got, grads = run()
    torch.manual_seed(8)
    assert (layer(x, adapter_names=names) - expected).abs().max() > 1e-3  # dropout really draws masks
    assert_close_relative(got, expected)
    assert expected_grads.keys() == grads.keys()
    for name in expected_grads:
        assert_close_relative(grads[name], expected_grads[name])


@pytest.mark.parametrize("mixed", [False, True], ids=["active", "mixed"])
def test_bf16_base_with_fp32_adapters_matches_peft_roundings(mixed):
    model = _peft({"a": peft.LoraConfig(r=4, target_modules=TARGETS), "b": peft.LoraConfig(r=8, target_modules=TARGETS)},
                  base=tiny_llama(dtype=torch.bfloat16))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A["a"].weight.dtype == torch.float32
    kwargs = {"adapter_names": ["b", "a", "__base__", "b"]} if mixed else {}
    got = _compare(model, _ids(), tolerance=1e-2, **kwargs)
    assert got.dtype == torch.bfloat16


def test_layer_level_refusals_and_lola_class_contract():
    from lolakernels.peft.layers import LoraLinear

    layer = _train_mixed_batch_layer().eval()
    assert LoraLinear.replaces is peft.tuners.lora.Linear
    x = torch.randn(2, 24)
    with accelerated(layer):
        assert type(layer) is LoraLinear and lola_layer_count(layer) == 1
        with pytest.raises(ValueError, match="Length of `adapter_names`"):
            layer(torch.randn(3, 24), adapter_names=["x"])
        # PEFT leaves rows of adapters a layer does not hold on the base output (they may target other modules).
        with torch.no_grad():
            not_in_layer = layer(x, adapter_names=["not-here", "__base__"])
    assert type(layer) is peft.tuners.lora.Linear
    torch.testing.assert_close(not_in_layer, layer.base_layer(x), rtol=0, atol=0)


def test_nf4_peft_model_accelerates_and_restores():
    """peft.tuners.lora.bnb.Linear4bit and its bitsandbytes base become the lolakernels nf4 classes."""
    pytest.importorskip("bitsandbytes")
    nf4_layers = pytest.importorskip("lolakernels.peft.nf4_layers")
    from peft_cases import llama_multiple_of_64, nf4_quantized

    configs = {"a": peft.LoraConfig(r=4, target_modules=TARGETS),
               "b": peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "down_proj"])}
    model = _peft(configs, base=nf4_quantized(llama_multiple_of_64()))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    peft_class, bnb_class = type(q_proj), type(q_proj.base_layer)
    assert peft_class is peft.tuners.lora.bnb.Linear4bit
    input_ids = _ids()
    with accelerated(model):
        assert type(q_proj) is nf4_layers.LoraLinear4bit and type(q_proj.base_layer) is nf4_layers.Linear4bit
    assert type(q_proj) is peft_class and type(q_proj.base_layer) is bnb_class
    _compare(model, input_ids, tolerance=1e-5)
    _compare(model, input_ids, tolerance=1e-5, adapter_names=["b", "__base__", "a", "b"])
