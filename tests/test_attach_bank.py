"""lolakernels.peft.attach_bank on SmolLM2-135M-Instruct: a bank of the four PEFT adapters served
in one mixed batch gives the logits and greedy generations of PEFT running the bank's exported
adapters; an exact (svd, R = max rank) bank gives those of the original adapters."""
import copy

import pytest
import torch

from peft_cases import (MIXED_BATCH, adapters_for_compression, assert_close_relative, llama_multiple_of_64,
                        nf4_quantized, peft_model_with_adapters, prompts_batch, randomize_adapter)

peft = pytest.importorskip("peft")

import lolakernels  # noqa: E402
from lolakernels.peft import attach_bank  # noqa: E402
from lolakernels.peft.bank_serving import detach_bank  # noqa: E402


@pytest.fixture(scope="module")
def original(smollm2):
    return peft_model_with_adapters(smollm2)


@pytest.fixture(scope="module")
def bank_inputs(original):
    return adapters_for_compression(original)


@pytest.fixture(scope="module")
def served(smollm2):
    """One deep copy of the base model that each test attaches its bank to (and detaches)."""
    return copy.deepcopy(smollm2)


@pytest.fixture(scope="module")
def inputs(smollm2_tokenizer):
    from lolakernels.corpus import english_sentences

    texts = [" ".join(s.split()[:8]) for s in english_sentences()[10:10 + len(MIXED_BATCH)]]
    return prompts_batch(smollm2_tokenizer, texts)


def _ids(bank, names):
    return [-1 if n == "__base__" else bank.adapter_names.index(n) for n in names]


def _logits(model, inputs, **kwargs):
    """Logits at the real tokens: left-padding positions attend to nothing, and their logits are
    meaningless values that amplify rounding differences ~10x."""
    with torch.no_grad():
        return model(**inputs, **kwargs).logits[inputs["attention_mask"].bool()]


def test_exact_bank_serves_the_original_adapters(original, bank_inputs, served, inputs):
    bank = lolakernels.compress_adapters(bank_inputs, rank=16, method="svd", progress=False)
    expected = _logits(original, inputs, adapter_names=MIXED_BATCH)
    attach_bank(served, bank)
    try:
        by_id = _logits(served, inputs, adapter_ids=_ids(bank, MIXED_BATCH))
        by_name = _logits(served, inputs, adapter_ids=MIXED_BATCH)
        by_tensor = _logits(served, inputs, adapter_ids=torch.tensor(_ids(bank, MIXED_BATCH)))
        without_ids = _logits(served, inputs)
    finally:
        detach_bank(served)
    assert_close_relative(by_id, expected)
    torch.testing.assert_close(by_name, by_id, rtol=0, atol=0)
    torch.testing.assert_close(by_tensor, by_id, rtol=0, atol=0)
    torch.testing.assert_close(without_ids, _logits(served, inputs), rtol=0, atol=0)
    assert (without_ids - by_id).abs().max() > 1e-2


@pytest.fixture(scope="module")
def jd_bank_and_exported(smollm2, bank_inputs, tmp_path_factory):
    """A JD-Full R = 16 bank (lossy for these adapters) and PEFT running its exported adapters."""
    bank = lolakernels.compress_adapters(bank_inputs, rank=16, method="jd-full", progress=False)
    folder = tmp_path_factory.mktemp("exported")
    exported = None
    for name in bank.adapter_names:
        path = bank.export_peft(name, folder / name)
        if exported is None:
            exported = peft.PeftModel.from_pretrained(copy.deepcopy(smollm2), str(path), adapter_name=name)
        else:
            exported.load_adapter(str(path), adapter_name=name)
    return bank, exported.eval()


def test_bank_matches_peft_with_its_exported_adapters(jd_bank_and_exported, original, served, inputs):
    bank, exported = jd_bank_and_exported
    assert max(bank.reconstruction_error().by_adapter().values()) > 1e-3  # the bank really compresses
    expected = _logits(exported, inputs, adapter_names=MIXED_BATCH)
    attach_bank(served, bank)
    try:
        got = _logits(served, inputs, adapter_ids=MIXED_BATCH)
    finally:
        detach_bank(served)
    assert_close_relative(got, expected)
    # the bank's lossy compression shows against the original adapters, far above the tolerance
    assert (got - _logits(original, inputs, adapter_names=MIXED_BATCH)).abs().max() > 1e-3


def test_bank_greedy_generation_matches_peft(jd_bank_and_exported, served, inputs):
    bank, exported = jd_bank_and_exported
    settings = dict(max_new_tokens=6, do_sample=False)
    beams = dict(max_new_tokens=3, do_sample=False, num_beams=2)  # generate() repeats each sequence per beam
    with torch.no_grad():
        expected = exported.generate(**inputs, adapter_names=MIXED_BATCH, **settings)
        expected_beams = exported.generate(**inputs, adapter_names=MIXED_BATCH, **beams)
        attach_bank(served, bank)
        try:
            got = served.generate(**inputs, adapter_ids=MIXED_BATCH, **settings)
            got_beams = served.generate(**inputs, adapter_ids=MIXED_BATCH, **beams)
        finally:
            detach_bank(served)
    assert torch.equal(got, expected)
    assert torch.equal(got_beams, expected_beams)
    assert len({tuple(row.tolist()) for row in expected[:, inputs["input_ids"].shape[1]:]}) > 1


def test_bad_adapter_ids_are_refused(jd_bank_and_exported, served, inputs):
    bank, _ = jd_bank_and_exported
    attach_bank(served, bank)
    try:
        rows = len(MIXED_BATCH)
        with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 4\)"):
            _logits(served, inputs, adapter_ids=[0] * (rows - 1) + [4])
        with pytest.raises(ValueError, match="adapter_ids has 2 entries but the batch has 6"):
            _logits(served, inputs, adapter_ids=[0, 1])
        with pytest.raises(ValueError, match="'nope' is not an adapter of the bank"):
            _logits(served, inputs, adapter_ids=["nope"] * rows)
        with pytest.raises(TypeError, match="adapter_ids must hold integers"):
            _logits(served, inputs, adapter_ids=torch.zeros(rows))
        with pytest.raises(ValueError, match="already attached"):
            attach_bank(served, bank)
        # the model still works after refused calls (no LoraBatch left behind)
        torch.testing.assert_close(_logits(served, inputs), _logits(served, inputs, adapter_ids=-1), rtol=0, atol=0)
    finally:
        detach_bank(served)
    assert not served._forward_pre_hooks and "generate" not in served.__dict__


def test_bank_from_another_model_is_refused(jd_bank_and_exported):
    from lolakernels.models import tiny_llama

    bank, _ = jd_bank_and_exported
    with pytest.raises(ValueError, match=r"bank slot 'model\.layers\.\d+\.\w+\.\w+' is not a module of this model"):
        attach_bank(tiny_llama(), bank)


def test_nf4_base_serves_the_bank_like_peft():
    """The base quantized to nf4 by bitsandbytes: the bank's term adds to the 4-bit layer's output."""
    pytest.importorskip("bitsandbytes")
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    configs = {"a": peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
               "b": peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"])}
    dense = llama_multiple_of_64()
    original = None
    for index, (name, config) in enumerate(configs.items()):
        if original is None:
            original = peft.get_peft_model(copy.deepcopy(dense), config, adapter_name=name)
        else:
            original.add_adapter(name, config)
        randomize_adapter(original, name, index, 0.3)
    bank = lolakernels.compress_adapters(adapters_for_compression(original), rank=8, method="svd", progress=False)

    def quantized():
        return nf4_quantized(dense)

    ids = torch.randint(0, 512, (3, 6), generator=torch.Generator().manual_seed(1))
    names = ["b", "__base__", "a"]
    peft_nf4 = peft.get_peft_model(quantized(), copy.deepcopy(original.peft_config["a"]), adapter_name="a")
    peft_nf4.add_adapter("b", copy.deepcopy(original.peft_config["b"]))
    for name in configs:
        set_peft_model_state_dict(peft_nf4, get_peft_model_state_dict(original, adapter_name=name), adapter_name=name)
    assert type(peft_nf4.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        expected = peft_nf4.eval()(input_ids=ids, adapter_names=names).logits
        served = attach_bank(quantized(), bank)
        got = served(input_ids=ids, adapter_ids=names).logits
    assert_close_relative(got, expected, 1e-5)
