"""multi_lora / shared_basis_lora against PEFT's own mixed-batch forward (adapter_names=)."""
import pytest
import torch

import lolakernels
from conftest import CPU_BACKENDS

peft = pytest.importorskip("peft")

ADAPTERS = {  # name -> (r, lora_alpha, use_rslora)
    "alpha": (4, 8, False),
    "beta": (8, 8, False),
    "gamma": (3, 16, True),
    "delta": (8, 4, False),
}


class TwoLayer(torch.nn.Module):
    def __init__(self, d_in=48, d_hidden=40):
        super().__init__()
        self.up = torch.nn.Linear(d_in, d_hidden)
        self.down = torch.nn.Linear(d_hidden, d_in, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _peft_model():
    torch.manual_seed(0)
    model = TwoLayer()
    peft_model = None
    for name, (r, alpha, rslora) in ADAPTERS.items():
        config = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["up"],
                                 init_lora_weights=False)
        if peft_model is None:
            peft_model = peft.get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    return peft_model.eval()


def _stacked(layer, names, dtype):
    """PEFT adapters of one layer padded to a common rank: lora_a [N, r_max, d_in], lora_b [N, d_out, r_max]."""
    r_max = max(layer.r[n] for n in names)
    d_in, d_out = layer.in_features, layer.out_features
    lora_a = torch.zeros(len(names), r_max, d_in)
    lora_b = torch.zeros(len(names), d_out, r_max)
    for i, name in enumerate(names):
        r = layer.r[name]
        lora_a[i, :r] = layer.lora_A[name].weight.detach()
        lora_b[i, :, :r] = layer.lora_B[name].weight.detach()
    scale = torch.tensor([layer.scaling[n] for n in names], dtype=torch.float32)
    ranks = torch.tensor([layer.r[n] for n in names], dtype=torch.int32)
    return lora_a.to(dtype), lora_b.to(dtype), scale, ranks


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS[:2], ids=["reference", "cpu"])
@pytest.mark.parametrize("batch", [["alpha", "__base__", "gamma", "beta", "delta", "alpha"], ["__base__"], ["beta"]])
def test_multi_lora_matches_peft_mixed_batch(use_backend, backend, isa, batch):
    use_backend(backend, isa)
    model = _peft_model()
    names = list(ADAPTERS)
    layer = model.base_model.model.up
    x = torch.randn(len(batch), 5, 48)
    with torch.no_grad():
        expected = layer(x, adapter_names=batch)
        lora_a, lora_b, scale, ranks = _stacked(layer, names, torch.float32)
        ids = torch.tensor([names.index(n) if n != "__base__" else -1 for n in batch], dtype=torch.int32)
        tokens = x.reshape(-1, 48)
        out = layer.base_layer(tokens)
        lolakernels.multi_lora(tokens, lora_a, lora_b, ids.repeat_interleave(5), scale=scale, ranks=ranks, out=out)
    torch.testing.assert_close(out.reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)


def test_shared_basis_reproduces_peft_adapters_that_share_a_basis():
    """Adapters built as B·Σ_i·A from one shared (A, B): the compressed call equals PEFT's output."""
    torch.manual_seed(1)
    rank, d_in, d_out, n = 6, 32, 24, 3
    shared_a = torch.randn(rank, d_in) / d_in ** 0.5
    shared_b = torch.randn(d_out, rank) / rank ** 0.5
    sigmas = torch.randn(n, rank, rank)
    model = TwoLayer(d_in, d_out)
    peft_model = None
    for i in range(n):
        config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["up"], init_lora_weights=False)
        name = f"adapter{i}"
        if peft_model is None:
            peft_model = peft.get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        layer = peft_model.base_model.model.up
        # lora_B · lora_A = (B Σ_i) · A; PEFT's scaling alpha/r = 1.
        layer.lora_A[name].weight.data.copy_(shared_a)
        layer.lora_B[name].weight.data.copy_(shared_b @ sigmas[i])
    layer = peft_model.base_model.model.up
    batch = ["adapter2", "__base__", "adapter0", "adapter1"]
    x = torch.randn(4, 3, d_in)
    with torch.no_grad():
        expected = layer(x, adapter_names=batch)
        ids = torch.tensor([2, -1, 0, 1], dtype=torch.int32).repeat_interleave(3)
        tokens = x.reshape(-1, d_in)
        out = lolakernels.shared_basis_lora(tokens, shared_a[None], shared_b[None], sigmas, ids,
                                            out=layer.base_layer(tokens))
    torch.testing.assert_close(out.reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)
