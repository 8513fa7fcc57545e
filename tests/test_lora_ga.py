"""LoRA-GA on a tiny Llama: the initial forward is the base model's, the first gradient step is
the recipe's rank-2r approximation of the full fine-tuning step, the directions agree with PEFT's
built-in LoRA-GA, and the exported plain LoRA reproduces the trained model."""
import copy
import math

import pytest
import torch

from lolakernels.init import lora_ga
from lolakernels.init.lora_ga_init import lora_ga_export, weight_gradients
from lolakernels.models import tiny_llama

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
RANK, ALPHA, GAMMA = 4, 8, 16


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from threads, and on a shared machine idle threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batches(count=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 512, (2, 24), generator=generator)
        batches.append(dict(input_ids=ids, labels=ids))
    return batches


def _config(**overrides):
    return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, **overrides)


def _lora_layers(peft_model):
    return [(name, module) for name, module in peft_model.base_model.model.named_modules()
            if hasattr(module, "lora_A") and "default" in module.lora_A]


@pytest.fixture(scope="module")
def base_and_grads():
    base = tiny_llama()
    batches = _batches()
    return base, batches, weight_gradients(base, _config(), batches)


def test_initial_forward_equals_base_model(base_and_grads):
    base, batches, grads = base_and_grads
    model = lora_ga(copy.deepcopy(base), _config(), grads)
    tokens = batches[0]["input_ids"]
    with torch.no_grad():
        expected = base(tokens).logits
        got = model(tokens).logits
        # The adapter is not trivially zero: without it the offset weights give another output.
        with model.disable_adapter():
            offset_only = model(tokens).logits
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)
    assert (offset_only - expected).abs().max() > 1e-3
    for _, layer in _lora_layers(model):
        assert layer.lora_B["default"].weight.abs().max() > 0


def test_initial_forward_bfloat16_model(base_and_grads):
    """bfloat16 base weights: the offset W − s·B₀A₀ is rounded once to bfloat16, so the initial
    forward matches the bfloat16 base model within the error bfloat16 itself brings."""
    base, batches, grads = base_and_grads
    base_bf16 = copy.deepcopy(base).to(torch.bfloat16)
    model = lora_ga(copy.deepcopy(base_bf16), _config(), grads)
    tokens = batches[0]["input_ids"]
    with torch.no_grad():
        exact = base(tokens).logits
        plain_error = (base_bf16(tokens).logits.float() - exact).abs().max()
        got = model(tokens).logits.float()
    assert (got - base_bf16(tokens).logits.float()).abs().max() <= 2 * plain_error


def _first_step(model, batches):
    model.train()
    model.zero_grad()
    for batch in batches:
        (model(**batch).loss / len(batches)).backward()


def test_first_gradient_step_is_the_rank_2r_gradient(base_and_grads):
    """s·(∇B·A + B·∇A) = s²ζ²·G_[2r], the best rank-2r approximation of the full gradient G."""
    base, batches, grads = base_and_grads
    model = lora_ga(copy.deepcopy(base), _config(), grads, niter=16)
    _first_step(model, batches)
    for name, layer in _lora_layers(model):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        s = layer.scaling["default"]
        gradient = grads[name].double()
        zeta2 = math.sqrt(gradient.shape[0]) / GAMMA
        # The chain rule through the LoRA branch (the forward equals the base model's, so G is the
        # gradient at the effective weight too).
        torch.testing.assert_close(a.grad.double(), s * b.double().T @ gradient, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(b.grad.double(), s * gradient @ a.double().T, rtol=1e-4, atol=1e-7)
        step = s * (b.grad.double() @ a.double() + b.double() @ a.grad.double())
        u, sigma, vh = torch.linalg.svd(gradient)
        best = s * s * zeta2 * (u[:, :2 * RANK] * sigma[:2 * RANK] @ vh[:2 * RANK])
        assert ((step - best).norm() / best.norm()).item() < 1e-4, name


def test_default_randomized_svd_gives_a_near_optimal_rank_2r_step(base_and_grads):
    base, batches, grads = base_and_grads
    model = lora_ga(copy.deepcopy(base), _config(), grads)
    _first_step(model, batches)
    for name, layer in _lora_layers(model):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        s = layer.scaling["default"]
        gradient = grads[name].double()
        zeta2 = math.sqrt(gradient.shape[0]) / GAMMA
        step = (b.grad.double() @ a.double() + b.double() @ a.grad.double()) / (s * zeta2)
        sigma = torch.linalg.svdvals(gradient)
        optimal = sigma[2 * RANK:].norm()
        assert (gradient - step).norm() <= 1.02 * optimal, name


def test_sgd_step_moves_the_effective_weight_along_the_truncated_gradient(base_and_grads):
    """One real SGD step: s·(B'A' − BA) = −η·s²ζ²·G_[2r] + η²·s·∇B·∇A (the exact expansion)."""
    base, batches, grads = base_and_grads
    model = lora_ga(copy.deepcopy(base), _config(), grads, niter=16)
    before = {name: (layer.lora_B["default"].weight.detach().double(), layer.lora_A["default"].weight.detach().double())
              for name, layer in _lora_layers(model)}
    _first_step(model, batches)
    lr = 1e-2
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr).step()
    for name, layer in _lora_layers(model):
        s = layer.scaling["default"]
        b0, a0 = before[name]
        b1, a1 = layer.lora_B["default"].weight.detach().double(), layer.lora_A["default"].weight.detach().double()
        moved = s * (b1 @ a1 - b0 @ a0)
        gradient = grads[name].double()
        u, sigma, vh = torch.linalg.svd(gradient)
        first_order = -lr * s * s * math.sqrt(gradient.shape[0]) / GAMMA * (u[:, :8] * sigma[:8] @ vh[:8])
        grad_b, grad_a = layer.lora_B["default"].weight.grad.double(), layer.lora_A["default"].weight.grad.double()
        second_order = lr * lr * s * grad_b @ grad_a
        expected = first_order + second_order
        assert ((moved - expected).norm() / expected.norm()).item() < 1e-3, name


def test_directions_match_peft_builtin_lora_ga():
    """PEFT 0.21.2's init_lora_weights="lora_ga" takes the same singular directions (A from the
    top r, B from r..2r) but scales differently (S into B, B only scaled): the rows of A and the
    columns of B agree in direction. The gradient is planted with a decaying spectrum, so both
    randomized SVDs are accurate and any mismatch is a recipe difference."""
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    base = tiny_llama(seed=1)
    generator = torch.Generator().manual_seed(3)
    planted = {}
    for name, module in base.named_modules():
        if name.split(".")[-1] in TARGETS:
            d_out, d_in = module.weight.shape
            u, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=generator))
            v, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=generator))
            k = min(d_out, d_in)
            planted[name] = (u[:, :k] * 0.7 ** torch.arange(k)) @ v[:, :k].T

    def train_step():
        # Through the module's forward (PEFT counts backward calls per module): with x = I the
        # output is Wᵀ, and Σ Wᵀ ⊙ Gᵀ has gradient G.
        for name, module in peft_model_base.named_modules():
            if name in planted:
                (module(torch.eye(module.in_features)) * planted[name].T).sum().backward()

    peft_model_base = copy.deepcopy(base)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="lora_ga",
                             lora_ga_config=LoraGAConfig(direction="ArB2r", scale="stable", stable_gamma=GAMMA))
    preprocess_loraga(peft_model_base, config, train_step)
    reference = peft.get_peft_model(peft_model_base, config)
    ours = lora_ga(copy.deepcopy(base), _config(), planted)
    pairs = list(zip(_lora_layers(ours), _lora_layers(reference)))
    assert len(pairs) == 8
    for (name, layer), (_, peft_layer) in pairs:
        for got, expected in ((layer.lora_A["default"].weight, peft_layer.lora_A["default"].weight),
                              (layer.lora_B["default"].weight.T, peft_layer.lora_B["default"].weight.T)):
            cosines = torch.nn.functional.cosine_similarity(got.double(), expected.double(), dim=1).abs()
            assert cosines.min() > 1 - 1e-6, name
        zeta = planted[name].shape[0] ** 0.25 / GAMMA ** 0.5
        torch.testing.assert_close(layer.lora_A["default"].weight.norm(dim=1), torch.full((RANK,), zeta))


def _train(model, steps=3):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        for batch in _batches(2, seed=10 + step):
            model(**batch).loss.backward()
        optimizer.step()
    return model.eval()


def test_exported_adapter_reproduces_the_trained_model(base_and_grads, tmp_path):
    base, batches, grads = base_and_grads
    model = lora_ga(copy.deepcopy(base), _config(), grads)
    model.save_pretrained(tmp_path / "initial")
    _train(model)
    tokens = batches[1]["input_ids"]
    with torch.no_grad():
        trained = model(tokens).logits
    assert (trained - base(tokens).logits).abs().max() > 1e-3
    for name, initial in (("recorded", None), ("from_directory", tmp_path / "initial")):
        out = lora_ga_export(model, tmp_path / name, initial=initial)
        config = peft.LoraConfig.from_pretrained(str(out))
        assert (config.r, config.lora_alpha, config.init_lora_weights) == (2 * RANK, 2 * ALPHA, True)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(tokens).logits, trained, atol=2e-5, rtol=1e-5)


def test_exported_rank_r_adapter_is_the_best_rank_r_update(base_and_grads, tmp_path):
    base, _, grads = base_and_grads
    model = lora_ga(copy.deepcopy(base), _config(use_rslora=True), grads)
    initial = {name: (layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone())
               for name, layer in _lora_layers(model)}
    _train(model, steps=2)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(lora_ga_export(model, tmp_path, rank=RANK)))
    exported = dict(_lora_layers(loaded))
    for name, layer in _lora_layers(model):
        s = layer.scaling["default"]
        a0, b0 = initial[name]
        b1, a1 = layer.lora_B["default"].weight.detach().double(), layer.lora_A["default"].weight.detach().double()
        update = s * (b1 @ a1 - b0.double() @ a0.double())
        u, sigma, vh = torch.linalg.svd(update)
        best = u[:, :RANK] * sigma[:RANK] @ vh[:RANK]
        got_layer = exported[name]
        got = got_layer.scaling["default"] * (got_layer.lora_B["default"].weight.detach().double()
                                              @ got_layer.lora_A["default"].weight.detach().double())
        assert ((got - best).norm() / best.norm()).item() < 1e-5, name


def test_lora_ga_rejects_bad_input(base_and_grads):
    from peft.tuners.lora import LoraLayer

    base, _, grads = base_and_grads
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="named_grads has no gradient for 'model.layers.0.self_attn.q_proj'"):
        lora_ga(model, _config(), {k: v for k, v in grads.items() if "0.self_attn.q_proj" not in k})
    # The refused model is left as it was: no LoRA layers, weights untouched.
    assert not any(isinstance(module, LoraLayer) for module in model.modules())
    for (name, value), expected in zip(model.state_dict().items(), base.state_dict().values()):
        assert torch.equal(value, expected), name
    with pytest.raises(TypeError, match=r"named_grads\['model.layers.0.mlp.down_proj'\] must be a tensor"):
        lora_ga(copy.deepcopy(base), _config(), {**grads, "model.layers.0.mlp.down_proj": [[0.0]]})
    wrong = dict(grads)
    wrong["model.layers.1.mlp.up_proj"] = wrong["model.layers.1.mlp.up_proj"].T
    with pytest.raises(ValueError, match=r"named_grads\['model.layers.1.mlp.up_proj'\] has shape \[64, 160\]"):
        lora_ga(copy.deepcopy(base), _config(), wrong)
    with pytest.raises(ValueError, match="direction"):
        lora_ga(copy.deepcopy(base), _config(), grads, direction="BrA2r")
    with pytest.raises(ValueError, match="stable_gamma"):
        lora_ga(copy.deepcopy(base), _config(), grads, stable_gamma=0)
    with pytest.raises(ValueError, match="2r = 40"):
        lora_ga(copy.deepcopy(base), peft.LoraConfig(r=20, target_modules=["v_proj"]), grads)
    with pytest.raises(TypeError, match="peft_config must be a peft.LoraConfig"):
        lora_ga(copy.deepcopy(base), {"r": 4}, grads)
    wrapped = peft.get_peft_model(copy.deepcopy(base), _config())
    with pytest.raises(TypeError, match="not a PeftModel"):
        lora_ga(wrapped, _config(), grads)
    with pytest.raises(ValueError, match="no LoRA-GA initial factors"):
        lora_ga_export(wrapped, "unused")
    with pytest.raises(ValueError, match="batches is empty"):
        weight_gradients(base, _config(), [])
