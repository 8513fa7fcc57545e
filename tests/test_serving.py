"""lolakernels.serving: LoraBatch metadata and checks, add_lora over fused output slices against an
fp64 formula, torch.compile(fullgraph=True) of a serving step, and the documented engine example."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lolakernels.serving import LoraBatch, add_lora
from lolakernels.serving.layers import LoraSlice, LoraSlot

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "engine_decode_loop.py"


def test_prepare_builds_token_map_segments_and_padding():
    batch = LoraBatch(16, 5, max_sequences=6)
    batch.prepare([3, 3, -1, 0, 0, 4], [2, 1, 3, 0, 2, 1])
    assert batch.num_tokens == 9 and batch.num_sequences == 6 and batch.has_adapters
    assert batch.token_adapter_ids.tolist() == [3, 3, 3, -1, -1, -1, 0, 0, 4] + [-1] * 7
    assert batch.num_segments == 4  # runs: 3 (3 tokens), -1 (3), 0 (2; the empty sequence vanishes), 4 (1)
    assert batch.segment_starts[:5].tolist() == [0, 3, 6, 8, 9]
    assert batch.segment_starts[5:].tolist() == [9, 9]
    assert batch.segment_adapter_ids[:4].tolist() == [3, -1, 0, 4]
    assert batch.token_ids().tolist() == [3, 3, 3, -1, -1, -1, 0, 0, 4]
    buffer = batch.token_adapter_ids.data_ptr()
    batch.prepare([-1, -1])  # a decode step: one token each; same buffers
    assert batch.token_adapter_ids.data_ptr() == buffer
    assert batch.num_tokens == 2 and not batch.has_adapters
    assert batch.token_adapter_ids.tolist() == [-1] * 16


@pytest.mark.parametrize("adapter_ids,seq_lens,error,match", [
    ([0, 5], None, ValueError, r"adapter_ids must lie in \[-1, 5\).*got 5"),
    ([0, -2], None, ValueError, r"adapter_ids must lie in \[-1, 5\).*got -2"),
    ([0, 1], [1], ValueError, "seq_lens has 1 entries but adapter_ids has 2"),
    ([0, 1], [1, -1], ValueError, "seq_lens must be >= 0"),
    ([0, 1], [10, 7], ValueError, "17 tokens > max_tokens = 16"),
    ([0] * 7, None, ValueError, "7 sequences > max_sequences = 6"),
    ([0.0, 1.0], None, TypeError, "adapter_ids must hold ints"),
    (torch.tensor([0.0]), None, TypeError, "adapter_ids must hold integers"),
    ([[0, 1]], None, TypeError, "adapter_ids must hold ints"),
    (torch.tensor([[0, 1]]), None, ValueError, "adapter_ids must be 1-D"),
])
def test_prepare_refuses_bad_input(adapter_ids, seq_lens, error, match):
    batch = LoraBatch(16, 5, max_sequences=6)
    with pytest.raises(error, match=match):
        batch.prepare(adapter_ids, seq_lens)


def _bank_slice(d_in, d_out, clusters, adapters, rank, full, generator):
    lora_a = torch.randn(clusters, rank, d_in, generator=generator) / d_in ** 0.5
    lora_b = torch.randn(clusters, d_out, rank, generator=generator) / rank ** 0.5
    shape = (adapters, rank, rank) if full else (adapters, rank)
    sigma = torch.randn(*shape, generator=generator)
    basis_of = torch.randint(0, clusters, (adapters,), generator=generator, dtype=torch.int32)
    return LoraSlice(lora_a, lora_b, sigma, basis_of)


def _expected(x, slot, ids):
    """fp64 per-token formula."""
    rows = []
    for t in range(x.shape[0]):
        parts = []
        for lora_slice, width in zip(slot.slices, slot.output_slices):
            a = int(ids[t])
            if lora_slice is None or a < 0:
                parts.append(torch.zeros(width, dtype=torch.float64))
                continue
            if lora_slice.sigma is None:
                r = int(lora_slice.ranks[a]) if lora_slice.ranks is not None else lora_slice.lora_a.shape[1]
                h = lora_slice.lora_a[a, :r].double() @ x[t].double()
                parts.append(float(lora_slice.scale[a]) * (lora_slice.lora_b[a, :, :r].double() @ h))
                continue
            c = int(lora_slice.basis_of[a])
            h = lora_slice.lora_a[c].double() @ x[t].double()
            sigma = lora_slice.sigma[a].double()
            g = sigma * h if sigma.dim() == 1 else sigma @ h
            parts.append(lora_slice.lora_b[c].double() @ g)
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def _qkv_slot(generator, d_in=40, sizes=(24, 8, 8), adapters=5):
    q = _bank_slice(d_in, sizes[0], 2, adapters, 6, True, generator)
    v = _bank_slice(d_in, sizes[2], 1, adapters, 4, False, generator)
    return LoraSlot([q, None, v], sizes)  # k_proj not adapted: an empty slice


def test_add_lora_fused_slices_match_formula():
    generator = torch.Generator().manual_seed(0)
    slot = _qkv_slot(generator)
    batch = LoraBatch(32, 5).prepare([4, -1, 0, 2, 2], [3, 2, 1, 4, 1])
    x = torch.randn(11, 40, generator=generator)
    base = torch.randn(11, 40, generator=generator)
    out = add_lora(base.clone(), x, slot, batch)
    torch.testing.assert_close(out.double(), base.double() + _expected(x, slot, batch.token_ids()), rtol=1e-5,
                               atol=1e-5)
    assert torch.equal(out[3:5], base[3:5]) and torch.equal(out[:, 24:32], base[:, 24:32])


def test_add_lora_stacked_plain_adapters_with_ranks_and_scale():
    generator = torch.Generator().manual_seed(1)
    lora_a = torch.randn(3, 8, 20, generator=generator)
    lora_b = torch.randn(3, 12, 8, generator=generator)
    ranks = torch.tensor([8, 3, 5])
    slot = LoraSlot.from_stacked(lora_a, lora_b, torch.tensor([0.5, 2.0, 1.5]), ranks)
    batch = LoraBatch(8, 3).prepare([1, 0, -1, 2])
    x = torch.randn(4, 20, generator=generator)
    out = add_lora(torch.zeros(4, 12), x, slot, batch)
    torch.testing.assert_close(out.double(), _expected(x, slot, batch.token_ids()), rtol=1e-5, atol=1e-5)


def test_add_lora_refuses_mismatches():
    generator = torch.Generator().manual_seed(2)
    slot = _qkv_slot(generator)
    batch = LoraBatch(8, 5).prepare([0, 1])
    x, out = torch.randn(2, 40), torch.zeros(2, 40)
    with pytest.raises(ValueError, match="out has 39 columns but the slot's output_slices"):
        add_lora(torch.zeros(2, 39), x, slot, batch)
    with pytest.raises(ValueError, match="x has d_in = 41"):
        add_lora(out, torch.randn(2, 41), slot, batch)
    with pytest.raises(ValueError, match="9 tokens > max_tokens = 8"):
        add_lora(torch.zeros(9, 40), torch.randn(9, 40), slot, batch)
    with pytest.raises(ValueError, match="slot holds 5 adapters but the LoraBatch was built for 4"):
        add_lora(out, x, slot, LoraBatch(8, 4).prepare([0, 1]))
    with pytest.raises(ValueError, match="basis_of must lie in"):
        bad = _bank_slice(40, 8, 2, 5, 4, False, generator)
        LoraSlot([bad._replace(basis_of=torch.tensor([0, 1, 2, 0, 0], dtype=torch.int32))])
    with pytest.raises(ValueError, match="output_slices is required"):
        LoraSlot([None, _bank_slice(40, 8, 1, 5, 4, False, generator)])


def test_serving_step_compiles_fullgraph_and_follows_new_ids():
    """The compiled step reads the ids from the LoraBatch buffers: re-preparing the batch changes the
    result without a recompile or a graph break."""
    generator = torch.Generator().manual_seed(3)
    slot = _qkv_slot(generator)
    weight = torch.randn(40, 40, generator=generator) / 40 ** 0.5
    batch = LoraBatch(16, 5).prepare([1, 4, -1, 3], [2, 1, 1, 2])

    def fused_qkv(x):
        return add_lora(F.linear(x, weight), x, slot, batch)

    x = torch.randn(6, 40, generator=generator)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fused_qkv)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(fused_qkv, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for ids in ([1, 4, -1, 3], [0, 0, 2, -1]):
            batch.prepare(ids, [2, 1, 1, 2])
            expected = F.linear(x, weight).double() + _expected(x, slot, batch.token_ids())
            torch.testing.assert_close(compiled(x).double(), expected, rtol=1e-5, atol=1e-5)


def _load_example():
    spec = importlib.util.spec_from_file_location("engine_decode_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_engine_example_generates_what_attach_bank_generates():
    import copy

    pytest.importorskip("peft")
    from lolakernels.peft import attach_bank

    example = _load_example()
    model, _, bank = example.build(tiny=True, num_adapters=3, rank=4)
    prompts = torch.randint(0, 512, (4, 5), generator=torch.Generator().manual_seed(4))
    adapter_ids = [2, -1, 0, 1]
    engine = example.FusedLlamaEngine(model, bank, max_sequences=6, max_length=12)
    tokens = engine.generate(prompts, adapter_ids, 6)
    with torch.no_grad():
        expected = attach_bank(copy.deepcopy(model), bank).generate(
            prompts, attention_mask=torch.ones_like(prompts), adapter_ids=adapter_ids, max_new_tokens=6,
            do_sample=False)
    assert torch.equal(tokens, expected)
    assert len({tuple(row.tolist()) for row in tokens[:, 5:]}) == 4
