"""The nf4 drop-in layers against the real libraries: bitsandbytes' Linear4bit and PEFT's
lora.bnb.Linear4bit (LoRA and DoRA, bias, mixed-adapter batches), outputs and gradients, and
SmolLM2-135M-Instruct quantized to nf4 with two adapters (one DoRA).

PEFT runs in train mode with dropout 0: an eval-mode forward of bitsandbytes' Linear4bit on an
AVX512-BF16 CPU repacks the weight in place, after which PEFT's DoRA reads wrong numbers."""
import copy

import pytest
import torch


bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from lolakernels.peft.nf4_layers import Linear4bit, LoraLinear4bit  # noqa: E402


def _quantized_linear(n, k, *, bias, compute_dtype, generator):
    layer = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=compute_dtype, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(n, k, generator=generator) * 0.05, requires_grad=False,
                                     quant_type="nf4").to("cpu")
    if bias:
        layer.bias.data = torch.randn(n, generator=generator) * 0.1
    return layer


def _peft_layer(n, k, *, bias, compute_dtype, dora, seed=0):
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(_quantized_linear(n, k, bias=bias, compute_dtype=compute_dtype, generator=generator))
    model.is_loaded_in_4bit = True  # what transformers sets; PEFT then wraps with lora.bnb.Linear4bit
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"], use_dora=dora, lora_dropout=0.0)
    peft_model = peft.get_peft_model(model, config)
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(n, 8, generator=generator) * 0.1)
        if dora:
            layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.2 * torch.rand(n, generator=generator))
    return peft_model.train(), layer


def test_peft_wraps_nf4_layers_with_its_bnb_class():
    _, layer = _peft_layer(32, 64, bias=False, compute_dtype=torch.float32, dora=False)
    assert type(layer) is LoraLinear4bit.replaces


def _run(layer, x, seed=1):
    """Output and the gradients of x and every adapter parameter for a fixed upstream gradient."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    (y * upstream).sum().backward()
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters() if p.requires_grad})
    return y.detach(), grads


def _assert_close(ours, theirs, dtype, what):
    scale = max(float(theirs.float().abs().max()), 1e-6)
    error = float((ours.float() - theirs.float()).abs().max())
    # Same roundings, different fp32 summation order: a few ulps of the result's dtype.
    allowed = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype] * scale
    assert error <= allowed, f"{what}: max difference {error:.3g} > {allowed:.3g} (|max| {scale:.3g})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_lora_layer_matches_peft_outputs_and_gradients(dtype, dora, bias):
    model, layer = _peft_layer(96, 128, bias=bias, compute_dtype=dtype, dora=dora)
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(5)).to(dtype)
    expected, expected_grads = _run(layer, x)
    layer.__class__ = LoraLinear4bit
    try:
        ours, grads = _run(layer, x)
    finally:
        layer.__class__ = LoraLinear4bit.replaces
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    _assert_close(ours, expected, dtype, "output")
    assert set(grads) == set(expected_grads)
    for name, grad in expected_grads.items():
        assert grads[name] is not None, name
        _assert_close(grads[name], grad, dtype if name == "x" else torch.float32 if dtype == torch.float32
                      else torch.bfloat16, f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_plain_linear4bit_matches_bitsandbytes(dtype):
    layer = _quantized_linear(80, 192, bias=True, compute_dtype=dtype, generator=torch.Generator().manual_seed(2))
    layer.bias.requires_grad_(True)
    x = torch.randn(5, 192, generator=torch.Generator().manual_seed(3)).to(dtype)
    expected, expected_grads = _run(layer, x)
    layer.__class__ = Linear4bit
    ours, grads = _run(layer, x)
    layer.__class__ = Linear4bit.replaces
    _assert_close(ours, expected, dtype, "output")
    _assert_close(grads["x"], expected_grads["x"], dtype, "grad of x")
    _assert_close(grads["bias"], expected_grads["bias"], dtype, "grad of bias")


def test_mixed_adapter_batch_matches_peft():
    model, layer = _peft_layer(64, 128, bias=True, compute_dtype=torch.float32, dora=False, seed=3)
    model.add_adapter("second", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["0"]))
    with torch.no_grad():
        layer.lora_B["second"].weight.normal_(std=0.1)
    model.train()  # dropout is 0; train mode keeps bitsandbytes from repacking the weight
    names = ["default", "__base__", "second", "default"]
    x = torch.randn(4, 3, 128)
    with torch.no_grad():
        expected = layer(x, adapter_names=names)
        layer.__class__ = LoraLinear4bit
        ours = layer(x, adapter_names=names)
    layer.__class__ = LoraLinear4bit.replaces
    _assert_close(ours, expected, torch.float32, "mixed batch")


def test_swapped_layer_keeps_peft_state_and_merge():
    model, layer = _peft_layer(64, 128, bias=False, compute_dtype=torch.float32, dora=False, seed=4)
    keys = set(model.state_dict())
    layer.__class__ = LoraLinear4bit
    assert set(model.state_dict()) == keys and isinstance(layer, LoraLinear4bit.replaces)
    x = torch.randn(3, 128, requires_grad=True)
    unmerged = layer(x).detach()
    with pytest.warns(UserWarning):
        layer.merge()
    merged = layer(x).detach()  # PEFT's merged path: the base layer alone, on the requantized weight
    layer.unmerge()
    with model.disable_adapter():
        disabled = layer(x).detach()
    layer.__class__ = LoraLinear4bit.replaces
    assert float((merged - unmerged).abs().max()) < 0.2 * float(unmerged.abs().max())
    assert not torch.allclose(disabled, unmerged)


def test_dora_on_a_repacked_weight_is_refused():
    model, layer = _peft_layer(64, 128, bias=False, compute_dtype=torch.bfloat16, dora=True, seed=6)
    base = layer.get_base_layer()
    base.eval()
    with torch.no_grad():
        base(torch.randn(1, 128, dtype=torch.bfloat16))  # bitsandbytes repacks here on AVX512-BF16 CPUs
    if not getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack on this CPU (no AVX512-BF16)")
    layer.__class__ = LoraLinear4bit
    try:
        with pytest.raises(ValueError, match="packing_format_for_cpu"):
            layer(torch.randn(1, 128, dtype=torch.bfloat16))
    finally:
        layer.__class__ = LoraLinear4bit.replaces


# bitsandbytes quantizes ~3M parameters/s on this CPU: the first decoder layers keep the test short.
QUANTIZED_LAYERS = 4


def _quantize_linears(model, compute_dtype, num_layers=QUANTIZED_LAYERS):
    """Every nn.Linear of the first num_layers decoder layers becomes a bitsandbytes nf4 Linear4bit."""
    for layer in model.model.layers[:num_layers]:
        for name, module in list(layer.named_modules()):
            for child_name, child in list(module.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=compute_dtype, quant_type="nf4")
                quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                                     quant_type="nf4").to("cpu")
                if child.bias is not None:
                    quantized.bias.data = child.bias.data.clone()
                setattr(module, child_name, quantized)
    model.is_loaded_in_4bit = True
    return model


@pytest.mark.model
def test_smollm2_nf4_with_two_adapters_matches_peft(smollm2, smollm2_tokenizer):
    model = _quantize_linears(copy.deepcopy(smollm2), torch.float32)
    layers_to_transform = list(range(QUANTIZED_LAYERS))
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                           layers_to_transform=layers_to_transform)
    dora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"], use_dora=True,
                           lora_dropout=0.0, layers_to_transform=layers_to_transform)
    peft_model = peft.get_peft_model(model, lora, adapter_name="lora")
    peft_model.add_adapter("dora", dora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    peft_model.train()  # dropout is 0; train mode keeps bitsandbytes from repacking the weights
    ids = smollm2_tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLinear4bit.replaces)]
    assert len(layers) == QUANTIZED_LAYERS * 6
    for adapter in ("lora", "dora"):
        peft_model.base_model.set_adapter(adapter)
        with torch.no_grad():
            expected = peft_model(ids).logits
            for layer in layers:
                layer.__class__ = LoraLinear4bit
            ours = peft_model(ids).logits
            for layer in layers:
                layer.__class__ = LoraLinear4bit.replaces
        assert torch.isfinite(ours).all()
        error = float((ours - expected).abs().max())
        assert error <= 2e-4 * float(expected.abs().max()), (adapter, error)
        assert torch.equal(ours.argmax(-1), expected.argmax(-1))
