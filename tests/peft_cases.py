"""Shared PEFT set-ups for the drop-in, bank-serving and serving tests: four adapters of different
ranks, alphas, rsLoRA and target modules on one base model, and comparison helpers."""
from __future__ import annotations

import contextlib
import copy

import torch

peft = __import__("pytest").importorskip("peft")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> LoraConfig arguments
ADAPTERS = {
    "alpha": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "beta": dict(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.1, target_modules=ALL_LINEAR),
    "gamma": dict(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"]),
    "delta": dict(r=16, lora_alpha=8, target_modules=["gate_proj", "up_proj", "q_proj"]),
}
MIXED_BATCH = ["alpha", "__base__", "gamma", "beta", "delta", "beta"]


def randomize_adapter(model, name: str, seed: int, b_scale: float = 0.05) -> None:
    """Deterministic non-zero adapter weights (PEFT's default init makes B = 0, a no-op adapter)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer) and name in module.lora_A:
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
                a.copy_(torch.randn(a.shape, generator=generator) / a.shape[1] ** 0.5)
                b.copy_(torch.randn(b.shape, generator=generator) * b_scale / b.shape[1] ** 0.5)


def peft_model_with_adapters(base_model, adapters=ADAPTERS, seed: int = 0):
    """A PeftModel on a deep copy of ``base_model`` holding ``adapters`` (random weights), eval mode,
    first adapter active."""
    model = copy.deepcopy(base_model)
    peft_model = None
    for index, (name, arguments) in enumerate(adapters.items()):
        config = peft.LoraConfig(**arguments)
        if peft_model is None:
            peft_model = peft.get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        randomize_adapter(peft_model, name, seed + index)
    peft_model.base_model.set_adapter(next(iter(adapters)))
    return peft_model.eval()


@contextlib.contextmanager
def accelerated(model):
    """lolakernels layers in place for the block, PEFT's back afterwards."""
    from lolakernels.peft import accelerate, restore

    accelerate(model)
    try:
        yield model
    finally:
        restore(model)


def max_relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|."""
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def assert_close_relative(got: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    assert got.shape == expected.shape, (got.shape, expected.shape)
    error = max_relative_error(got, expected)
    assert error <= tolerance, f"max relative error {error:.2e} > {tolerance:.0e}"


def lola_layer_count(model) -> int:
    return sum(type(m).__module__.startswith("lolakernels.peft") for m in model.modules())


def prompts_batch(tokenizer, texts, device="cpu"):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(texts, return_tensors="pt", padding=True).to(device)


def adapters_for_compression(peft_model, names=None, base_model: str = "base"):
    """``{name: (LoraConfig, state_dict)}`` of a PeftModel's adapters for ``compress_adapters``.

    Every adapter is widened to the union of the adapted modules, with zero factors (a zero
    delta) where it had none, and one ``base_model_name_or_path``: the bank format expects
    one slot set for all adapters.
    """
    from peft.utils import get_peft_model_state_dict

    names = list(names or peft_model.peft_config)
    union = sorted({m for n in names for m in peft_model.peft_config[n].target_modules})
    layers = {name: module for name, module in peft_model.named_modules()
              if isinstance(module, peft.tuners.lora.LoraLayer)}
    result = {}
    for name in names:
        config = copy.deepcopy(peft_model.peft_config[name])
        config.target_modules = union
        config.base_model_name_or_path = base_model
        state = get_peft_model_state_dict(peft_model, adapter_name=name)
        rank = config.r
        for path, layer in layers.items():
            key = f"{path}.lora_A.weight"
            if name not in layer.lora_A and key not in state:
                state[key] = torch.zeros(rank, layer.in_features)
                state[f"{path}.lora_B.weight"] = torch.zeros(layer.out_features, rank)
        result[name] = (config, state)
    return result


def llama_multiple_of_64(seed: int = 0):
    """A small random Llama whose widths are multiples of 64: bitsandbytes' CPU path repacks 4-bit
    weights by rows of 64-blocks and fails on other widths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def nf4_quantized(dense_model, compute_dtype=torch.float32):
    """A copy of a Llama with every attention/MLP linear layer replaced by a bitsandbytes nf4
    ``Linear4bit`` holding the same weights (quantized on the CPU)."""
    import bitsandbytes as bnb

    model = copy.deepcopy(dense_model)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                                  compute_dtype=compute_dtype, quant_type="nf4")
                    quantized.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False,
                                                         quant_type="nf4")
                    setattr(parent, child_name, quantized.to("cpu"))
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; PEFT dispatches on it
    return model.eval()
