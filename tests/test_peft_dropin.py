"""lolakernels.peft.accelerate on SmolLM2-135M-Instruct with four PEFT adapters of different ranks,
alphas, rsLoRA and target modules: every PEFT behaviour gives PEFT's numbers (fp32 logits within
1e-5 relative, identical greedy generations), and restore() gives PEFT's layers back."""
import copy

import pytest
import torch
from safetensors.torch import load_file

from peft_cases import (MIXED_BATCH, accelerated, assert_close_relative, lola_layer_count,
                        peft_model_with_adapters, prompts_batch)

peft = pytest.importorskip("peft")

from lolakernels.peft import accelerate, restore  # noqa: E402

NUM_LAYERS, NUM_MODULES = 30, 7


@pytest.fixture(scope="module")
def peft_model(smollm2):
    return peft_model_with_adapters(smollm2)


@pytest.fixture(scope="module")
def inputs(smollm2_tokenizer):
    from lolakernels.corpus import english_sentences

    texts = [" ".join(s.split()[:9]) for s in english_sentences()[:len(MIXED_BATCH)]]
    return prompts_batch(smollm2_tokenizer, texts)


def _logits(model, inputs, **kwargs):
    """Logits at the real tokens: left-padding positions attend to nothing, and their logits are
    meaningless values that amplify rounding differences ~10x."""
    with torch.no_grad():
        return model(**inputs, **kwargs).logits[inputs["attention_mask"].bool()]


def test_accelerate_replaces_every_lora_layer_and_restore_puts_peft_back(peft_model):
    lora_type = peft.tuners.lora.Linear
    assert sum(type(m) is lora_type for m in peft_model.modules()) == NUM_LAYERS * NUM_MODULES
    with accelerated(peft_model):
        assert lola_layer_count(peft_model) == NUM_LAYERS * NUM_MODULES
        accelerate(peft_model)  # a second call changes nothing
        assert lola_layer_count(peft_model) == NUM_LAYERS * NUM_MODULES
        assert all(isinstance(m, lora_type) for m in peft_model.modules() if "lolakernels" in type(m).__module__)
    assert lola_layer_count(peft_model) == 0
    assert sum(type(m) is lora_type for m in peft_model.modules()) == NUM_LAYERS * NUM_MODULES
    assert not any(k.startswith("_lola_") for m in peft_model.modules() for k in m.__dict__)


def test_accelerate_refuses_a_model_without_lora_layers():
    with pytest.raises(TypeError, match="no PEFT LoRA layer"):
        accelerate(torch.nn.Linear(3, 3))


def test_mixed_batch_logits_match_peft(peft_model, inputs):
    expected = _logits(peft_model, inputs, adapter_names=MIXED_BATCH)
    with accelerated(peft_model):
        got = _logits(peft_model, inputs, adapter_names=MIXED_BATCH)
    assert_close_relative(got, expected)
    # The rows really differ by adapter, so the comparison covers each adapter's term.
    with torch.no_grad():
        full = peft_model(**inputs, adapter_names=MIXED_BATCH).logits
        base = peft_model(**inputs, adapter_names=["__base__"] * len(MIXED_BATCH)).logits
    for row in range(len(MIXED_BATCH)):
        differs = (full[row] - base[row]).abs().max() > 1e-2
        assert differs == (MIXED_BATCH[row] != "__base__"), MIXED_BATCH[row]


@pytest.mark.parametrize("active", [["alpha"], ["delta"], ["alpha", "beta", "gamma"]], ids=str)
def test_active_adapters_match_peft(peft_model, inputs, active):
    peft_model.base_model.set_adapter(active)
    try:
        expected = _logits(peft_model, inputs)
        with accelerated(peft_model):
            got = _logits(peft_model, inputs)
            with peft_model.disable_adapter():
                disabled = _logits(peft_model, inputs)
        with peft_model.disable_adapter():
            base = _logits(peft_model, inputs)
    finally:
        peft_model.base_model.set_adapter("alpha")
    assert_close_relative(got, expected)
    torch.testing.assert_close(disabled, base, rtol=0, atol=0)
    assert (expected - base).abs().max() > 1e-2


def test_scaling_changes_are_seen(peft_model, inputs):
    layers = [m for m in peft_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    with accelerated(peft_model):
        before = _logits(peft_model, inputs, adapter_names=MIXED_BATCH)
        for layer in layers:
            layer.set_scale("beta", 0.25)
            if "gamma" in layer.scaling:
                layer.scaling["gamma"] *= 3
        got = _logits(peft_model, inputs, adapter_names=MIXED_BATCH)
    expected = _logits(peft_model, inputs, adapter_names=MIXED_BATCH)
    for layer in layers:
        layer.set_scale("beta", 1.0)
        if "gamma" in layer.scaling:
            layer.set_scale("gamma", 1.0)
    assert_close_relative(got, expected)
    assert (got - before).abs().max() > 1e-2


def test_merge_unmerge_and_merge_and_unload_match_peft(peft_model, inputs):
    peft_model.base_model.set_adapter(["alpha", "gamma"])
    try:
        unmerged = _logits(peft_model, inputs)
        with accelerated(peft_model):
            peft_model.merge_adapter()
            merged = _logits(peft_model, inputs)
            # Layer level: PeftModel's hook that injects adapter_names stays registered when a forward raises.
            q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
            with pytest.raises(ValueError, match="merged adapters"):
                q_proj(torch.randn(2, 3, 576), adapter_names=["alpha", "beta"])
            peft_model.unmerge_adapter()
            after_unmerge = _logits(peft_model, inputs)
        assert_close_relative(merged, unmerged, 1e-4)  # merging rounds W + ΔW once more, as in PEFT
        assert_close_relative(after_unmerge, unmerged)

        model_copy = copy.deepcopy(peft_model)
        with accelerated(model_copy):
            unloaded = model_copy.merge_and_unload()
        assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in unloaded.modules())
        peft_unloaded = copy.deepcopy(peft_model).merge_and_unload()
        torch.testing.assert_close(_logits(unloaded, inputs), _logits(peft_unloaded, inputs), rtol=0, atol=0)
    finally:
        peft_model.base_model.set_adapter("alpha")


def test_training_with_dropout_gives_peft_loss_and_gradients(peft_model, inputs):
    """Dropout masks are drawn from PEFT's own dropout modules in PEFT's order: equal losses and grads."""
    peft_model.base_model.set_adapter("beta")  # lora_dropout = 0.1, every module
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def loss_and_grads():
        peft_model.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        loss = peft_model(**inputs, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}

    peft_model.train()
    try:
        expected_loss, expected_grads = loss_and_grads()
        with accelerated(peft_model):
            loss, grads = loss_and_grads()
    finally:
        peft_model.zero_grad(set_to_none=True)
        peft_model.eval()
        peft_model.base_model.set_adapter("alpha")
    assert expected_grads.keys() == grads.keys() and len(grads) == 2 * NUM_LAYERS * NUM_MODULES
    assert all(".beta." in name for name in grads)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
    # PEFT's own fp32 gradients here are up to ~3e-4 (relative) away from an fp64 run of the same
    # model; a different dropout mask would change them by ~10%.
    for name, grad in expected_grads.items():
        assert_close_relative(grads[name], grad, 1e-3)


def test_save_pretrained_and_load_adapter(peft_model, inputs, tmp_path):
    peft_model.save_pretrained(tmp_path / "peft", selected_adapters=["alpha", "delta"])
    with accelerated(peft_model):
        peft_model.save_pretrained(tmp_path / "lola", selected_adapters=["alpha", "delta"])
        peft_model.load_adapter(str(tmp_path / "lola" / "delta"), adapter_name="delta_copy")
        assert lola_layer_count(peft_model) == NUM_LAYERS * NUM_MODULES
        names = ["delta_copy" if n == "delta" else n for n in MIXED_BATCH]
        got = _logits(peft_model, inputs, adapter_names=names)
    expected = _logits(peft_model, inputs, adapter_names=MIXED_BATCH)
    peft_model.delete_adapter("delta_copy")
    for adapter in ("alpha", "delta"):
        files = [tmp_path / kind / adapter / "adapter_model.safetensors" for kind in ("peft", "lola")]
        saved, saved_by_lola = (load_file(f) for f in files)
        assert saved.keys() == saved_by_lola.keys() and len(saved) > 0
        for key in saved:
            torch.testing.assert_close(saved_by_lola[key], saved[key], rtol=0, atol=0)
    assert_close_relative(got, expected)


def test_greedy_mixed_batch_generation_is_identical(peft_model, inputs):
    settings = dict(max_new_tokens=6, do_sample=False, adapter_names=MIXED_BATCH)
    with torch.no_grad():
        expected = peft_model.generate(**inputs, **settings)
        with accelerated(peft_model):
            got = peft_model.generate(**inputs, **settings)
    assert torch.equal(got, expected)
    assert len({tuple(row.tolist()) for row in expected[:, inputs["input_ids"].shape[1]:]}) > 1


def test_mixed_batch_argument_errors_are_peft_errors(peft_model, inputs):
    with accelerated(peft_model):
        with pytest.raises(ValueError, match="Length of `adapter_names`"):
            layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
            layer(torch.randn(3, 4, 576), adapter_names=["alpha", "beta"])
        with pytest.raises(ValueError, match="non-existing adapter"):  # raised before any hook is registered
            _logits(peft_model, inputs, adapter_names=["alpha", "nope"] + MIXED_BATCH[2:])


def test_restore_after_use_gives_peft_numbers(peft_model, inputs):
    expected = _logits(peft_model, inputs, adapter_names=MIXED_BATCH)
    accelerate(peft_model)
    _logits(peft_model, inputs, adapter_names=MIXED_BATCH)
    restore(peft_model)
    assert lola_layer_count(peft_model) == 0
    torch.testing.assert_close(_logits(peft_model, inputs, adapter_names=MIXED_BATCH), expected, rtol=0, atol=0)
