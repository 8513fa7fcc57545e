"""svd_merge and fast_merge against PEFT 0.21.2's own add_weighted_adapter.

The oracle is PEFT's real merge on a PEFT model holding the same adapters. Two things any SVD
leaves free are pinned on PEFT's side so results can be compared exactly:
- singular-vector signs (they move svd_clamp's quantile): PEFT's torch.linalg.svd is wrapped to
  return canonical signs, the convention svd_merge uses;
- DARE's masks: the global RNG state at PEFT's first torch.bernoulli is recorded and restored
  before svd_merge runs (fast_merge needs no help: PEFT's own flow consumes the RNG).
"""
import copy

import pytest
import torch

from lolakernels.merge import svd_merge
from lolakernels.merge.factored_svd import canonical_signs

peft = pytest.importorskip("peft")

COMBINATIONS = ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]
# Largest allowed ‖ours − PEFT‖ / ‖PEFT‖ of the merged product B·A. The pruning types add the
# randomized SVD's residual error (measured ≤ 6e-5 on these cases).
PRODUCT_TOLERANCE = 2e-4
WEIGHTS = [0.6, -0.35, 0.9, 0.25]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from threads, and on a shared machine idle threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _signed_svd(plain):
    def svd(matrix, *args, **kwargs):
        u, s, vh = plain(matrix, *args, **kwargs)
        k = min(u.shape[-1], vh.shape[-2])
        u_k, vh_k = canonical_signs(u[:, :k], vh[:k])
        return torch.return_types.linalg_svd((torch.cat([u_k, u[:, k:]], 1), s, torch.cat([vh_k, vh[k:]], 0)))

    return svd


class _BernoulliRecorder:
    """Records the global RNG state at the first torch.bernoulli call (DARE's first mask)."""

    def __init__(self, plain):
        self.plain, self.state = plain, None

    def __call__(self, *args, **kwargs):
        if self.state is None:
            self.state = torch.get_rng_state()
        return self.plain(*args, **kwargs)


def _one_layer_peft(d_out, d_in, ranks, dtype, seed=0):
    """A PEFT model with one adapted Linear(d_in, d_out) holding len(ranks) adapters with random
    A and B (scale ~1 deltas), all stored in `dtype`."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(d_in, d_out, bias=False))
    peft_model = None
    for i, r in enumerate(ranks):
        config = peft.LoraConfig(r=r, lora_alpha=2 * r + i, target_modules=["proj"], use_rslora=(i == 2))
        if peft_model is None:
            peft_model = peft.get_peft_model(model, config, adapter_name="a0", autocast_adapter_dtype=False)
        else:
            peft_model.add_adapter(f"a{i}", config)
    layer = peft_model.base_model.model.proj
    with torch.no_grad():
        for i, r in enumerate(ranks):
            name = f"a{i}"
            layer.lora_A[name].weight.data = (torch.randn(r, d_in) / d_in ** 0.5).to(dtype)
            layer.lora_B[name].weight.data = (torch.randn(d_out, r) / r ** 0.5).to(dtype)
    return peft_model, layer


def _peft_merge(peft_model, monkeypatch, names, weights, combination_type, **kwargs):
    """PEFT's add_weighted_adapter with canonical SVD signs; returns (lora_A, lora_B, rng state at
    the first bernoulli or None)."""
    recorder = _BernoulliRecorder(torch.bernoulli)
    with monkeypatch.context() as patch:
        patch.setattr(torch.linalg, "svd", _signed_svd(torch.linalg.svd))
        patch.setattr(torch, "bernoulli", recorder)
        torch.manual_seed(11)
        peft_model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, **kwargs)
    layer = peft_model.base_model.model.proj
    return layer.lora_A["merged"].weight.detach(), layer.lora_B["merged"].weight.detach(), recorder.state


def _relative(got, expected):
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def _factors(layer, names):
    return ([layer.lora_A[n].weight.detach() for n in names], [layer.lora_B[n].weight.detach() for n in names],
            [layer.scaling[n] for n in names])


SHAPES = [(37, 53, (3, 5)), (64, 64, (4, 4, 4)), (96, 33, (2, 7, 5, 3))]


@pytest.mark.parametrize("combination_type", COMBINATIONS)
@pytest.mark.parametrize("d_out,d_in,ranks", SHAPES, ids=lambda v: str(v).replace(" ", ""))
def test_svd_merge_matches_peft_float32(monkeypatch, combination_type, d_out, d_in, ranks):
    peft_model, layer = _one_layer_peft(d_out, d_in, ranks, torch.float32)
    names = [f"a{i}" for i in range(len(ranks))]
    weights = WEIGHTS[: len(ranks)]
    density = 0.4 if combination_type.startswith("dare") else 0.6
    lora_a, lora_b, scalings = _factors(layer, names)
    expected_a, expected_b, rng_state = _peft_merge(peft_model, monkeypatch, names, weights, combination_type,
                                                    density=density)
    if rng_state is not None:
        torch.set_rng_state(rng_state)
    got_a, got_b = svd_merge(lora_a, lora_b, weights, combination_type, scalings=scalings, density=density)
    assert got_a.shape == expected_a.shape and got_b.shape == expected_b.shape
    assert got_a.dtype == expected_a.dtype == torch.float32
    assert _relative(got_b @ got_a, expected_b @ expected_a) < PRODUCT_TOLERANCE
    # PEFT's split: A = Vh_k has orthonormal rows, B = U_k S_k.
    torch.testing.assert_close(got_a @ got_a.T, torch.eye(got_a.shape[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("combination_type", ["svd", "ties_svd", "dare_ties_svd"])
@pytest.mark.parametrize("clamp", [0.9, 0.99])
def test_svd_merge_clamp_matches_peft(monkeypatch, combination_type, clamp):
    peft_model, layer = _one_layer_peft(45, 70, (6, 4, 5), torch.float32, seed=3)
    names = ["a0", "a1", "a2"]
    lora_a, lora_b, scalings = _factors(layer, names)
    expected_a, expected_b, rng_state = _peft_merge(peft_model, monkeypatch, names, WEIGHTS[:3], combination_type,
                                                    density=0.5, svd_clamp=clamp, svd_rank=5)
    if rng_state is not None:
        torch.set_rng_state(rng_state)
    got_a, got_b = svd_merge(lora_a, lora_b, WEIGHTS[:3], combination_type, scalings=scalings, density=0.5,
                             clamp=clamp, rank=5)
    # Canonical signs on both sides: the clipped factors themselves agree, not only their product.
    torch.testing.assert_close(got_a, expected_a, atol=2e-5, rtol=1e-3)
    torch.testing.assert_close(got_b, expected_b, atol=2e-5, rtol=1e-3)
    unclamped_a, unclamped_b = svd_merge(lora_a, lora_b, WEIGHTS[:3], combination_type, scalings=scalings,
                                         density=0.5, rank=5, generator=torch.Generator().manual_seed(0))
    assert got_a.abs().max() < unclamped_a.abs().max() or got_b.abs().max() < unclamped_b.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("combination_type", COMBINATIONS)
def test_svd_merge_low_precision_adapters(monkeypatch, dtype, combination_type):
    """float16/bfloat16 adapters. PEFT 0.21.2 merges them on the CPU (its deltas are rounded to the
    adapter dtype, then its float32 merge weights promote the sum to float32 before the SVD); the
    pruning types must reproduce that exactly, and ``svd``, computed from the factors without the
    rounding, must be at least as close to the exact merge as PEFT is."""
    ranks = (4, 6, 3)
    peft_model, layer = _one_layer_peft(40, 56, ranks, dtype, seed=5)
    names = ["a0", "a1", "a2"]
    lora_a, lora_b, scalings = _factors(layer, names)
    assert all(t.dtype == dtype for t in lora_a + lora_b)
    expected_a, expected_b, rng_state = _peft_merge(peft_model, monkeypatch, names, WEIGHTS[:3], combination_type,
                                                    density=0.5)
    if rng_state is not None:
        torch.set_rng_state(rng_state)
    got_a, got_b = svd_merge(lora_a, lora_b, WEIGHTS[:3], combination_type, scalings=scalings, density=0.5)
    assert got_a.dtype == got_b.dtype == expected_a.dtype == torch.float32
    if combination_type != "svd":
        assert _relative(got_b @ got_a, expected_b @ expected_a) < PRODUCT_TOLERANCE
        return
    exact = sum(w * s * b.double() @ a.double() for a, b, s, w in zip(lora_a, lora_b, scalings, WEIGHTS[:3]))
    u, s, vh = torch.linalg.svd(exact)
    best = u[:, :6] * s[:6] @ vh[:6]
    assert _relative(got_b @ got_a, best) < 1e-5
    assert _relative(got_b @ got_a, best) <= _relative(expected_b @ expected_a, best)


def test_svd_combination_never_forms_a_dense_delta_and_pads_beyond_its_rank(monkeypatch):
    """rank above Σ r_i: the merged delta has only Σ r_i non-zero singular values; the rest are zero
    components (PEFT fills them with arbitrary singular vectors of value 0)."""
    from lolakernels.merge import combine

    def refuse(*args, **kwargs):
        raise AssertionError("the svd combination formed a dense delta")

    monkeypatch.setattr(combine, "adapter_delta", refuse)
    generator = torch.Generator().manual_seed(2)
    lora_a = [torch.randn(2, 30, generator=generator), torch.randn(3, 30, generator=generator)]
    lora_b = [torch.randn(20, 2, generator=generator), torch.randn(20, 3, generator=generator)]
    new_a, new_b = svd_merge(lora_a, lora_b, [1.0, -2.0], rank=8)
    assert new_a.shape == (8, 30) and new_b.shape == (20, 8)
    assert new_b[:, 5:].abs().max() == 0 and new_a[5:].abs().max() == 0
    expected = lora_b[0] @ lora_a[0] - 2 * lora_b[1] @ lora_a[1]
    assert _relative(new_b @ new_a, expected) < 1e-5
    monkeypatch.undo()
    # A rank above min(d_out, d_in) returns min(d_out, d_in) components.
    assert svd_merge(lora_a, lora_b, [1.0, 1.0], "ties_svd", density=0.5, rank=25)[0].shape == (20, 30)


def test_svd_merge_float64_stays_float64():
    generator = torch.Generator().manual_seed(4)
    lora_a = [torch.randn(3, 17, generator=generator, dtype=torch.float64) for _ in range(2)]
    lora_b = [torch.randn(11, 3, generator=generator, dtype=torch.float64) for _ in range(2)]
    for combination_type in ("svd", "magnitude_prune_svd"):
        new_a, new_b = svd_merge(lora_a, lora_b, [0.5, 0.5], combination_type, density=1.0)
        assert new_a.dtype == new_b.dtype == torch.float64
        exact = 0.5 * (lora_b[0] @ lora_a[0] + lora_b[1] @ lora_a[1])
        u, s, vh = torch.linalg.svd(exact)
        assert _relative(new_b @ new_a, u[:, :3] * s[:3] @ vh[:3]) < 1e-12


def _small_factors():
    return [torch.randn(2, 6), torch.randn(3, 6)], [torch.randn(5, 2), torch.randn(5, 3)]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(combination_type="linear"), ValueError, "combination_type"),
    (dict(combination_type="ties_svd"), ValueError, "density is required"),
    (dict(combination_type="ties_svd", density=1.5), ValueError, "density = 1.5"),
    (dict(combination_type="magnitude_prune_svd", density="0.5"), TypeError, "density"),
    (dict(combination_type="dare_linear_svd", density=0.0), ValueError, "divide"),
    (dict(combination_type="ties_svd", density=0.5, majority_sign_method="mean"), ValueError, "majority_sign_method"),
    (dict(clamp=2.0), ValueError, "clamp"),
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=2.5), TypeError, "rank"),
    (dict(weights=[1.0]), ValueError, "weights has 1 entries"),
    (dict(scalings=[1.0, "x"]), TypeError, r"scalings\[1\]"),
    (dict(svd_method="qr", combination_type="ties_svd", density=0.5), ValueError, "svd_method"),
])
def test_svd_merge_rejects_bad_options(kwargs, error, match):
    lora_a, lora_b = _small_factors()
    kwargs = dict(kwargs)
    weights = kwargs.pop("weights", [1.0, 1.0])
    with pytest.raises(error, match=match):
        svd_merge(lora_a, lora_b, weights, **kwargs)


def test_svd_merge_rejects_bad_factors():
    lora_a, lora_b = _small_factors()
    with pytest.raises(ValueError, match=r"lora_a\[1\] has rank 3 .* lora_b\[1\] has 2"):
        svd_merge(lora_a, [lora_b[0], torch.randn(5, 2)], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"lora_a\[1\].shape\[1\] = 7 but lora_a\[0\] has d_in = 6"):
        svd_merge([lora_a[0], torch.randn(3, 7)], lora_b, [1.0, 1.0])
    with pytest.raises(ValueError, match=r"lora_b\[1\].shape\[0\] = 4"):
        svd_merge(lora_a, [lora_b[0], torch.randn(4, 3)], [1.0, 1.0])
    with pytest.raises(ValueError, match="lora_a must hold at least one"):
        svd_merge([], [], [])
    with pytest.raises(TypeError, match="lora_a must be a list"):
        svd_merge(torch.randn(2, 3, 6), lora_b, [1.0, 1.0])
    with pytest.raises(ValueError, match=r"lora_a\[0\] must be 2-D"):
        svd_merge([torch.randn(6), lora_a[1]], lora_b, [1.0, 1.0])
    with pytest.raises(TypeError, match=r"lora_b\[0\] has dtype int64"):
        svd_merge(lora_a, [torch.ones(5, 2, dtype=torch.int64), lora_b[1]], [1.0, 1.0])


# --------------------------------------------------------------------------- fast_merge


def _tiny_peft(dtype=torch.float32, target_modules=("q_proj", "v_proj", "down_proj")):
    from lolakernels.models import tiny_llama

    model = tiny_llama(dtype=dtype)
    peft_model = None
    for i, r in enumerate((4, 6, 3)):
        config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules), init_lora_weights=False)
        if peft_model is None:
            peft_model = peft.get_peft_model(model, config, adapter_name="a0", autocast_adapter_dtype=False)
        else:
            peft_model.add_adapter(f"a{i}", config)
    for module in peft_model.modules():
        for factors in (getattr(module, "lora_A", {}), getattr(module, "lora_B", {})):
            for layer in factors.values():
                layer.to(dtype)
        for params in (getattr(module, "lora_embedding_A", {}), getattr(module, "lora_embedding_B", {})):
            for name in list(params):
                params[name].data = params[name].data.to(dtype)
    return peft_model.eval()


def _merged_products(peft_model, name):
    products = {}
    for module_name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            products[module_name] = module.lora_B[name].weight.float() @ module.lora_A[name].weight.float()
        elif hasattr(module, "lora_embedding_A") and name in module.lora_embedding_A:
            products[module_name] = module.lora_embedding_B[name].float() @ module.lora_embedding_A[name].float()
    return products


def _compare_with_peft(monkeypatch, peft_model, combination_type, **kwargs):
    from lolakernels.peft import fast_merge

    patched = copy.deepcopy(peft_model)
    names, weights = ["a0", "a1", "a2"], [0.5, -0.3, 0.8]
    with monkeypatch.context() as patch:
        patch.setattr(torch.linalg, "svd", _signed_svd(torch.linalg.svd))
        torch.manual_seed(7)
        peft_model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, **kwargs)
    with fast_merge(patched) as handle:
        torch.manual_seed(7)
        patched.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, **kwargs)
    expected, got = _merged_products(peft_model, "merged"), _merged_products(patched, "merged")
    assert handle.merged_weights == len(expected) > 0
    assert got.keys() == expected.keys()
    for module_name in expected:
        assert _relative(got[module_name], expected[module_name]) < PRODUCT_TOLERANCE, module_name
    assert patched.peft_config["merged"] == peft_model.peft_config["merged"]
    return patched


@pytest.mark.parametrize("combination_type", COMBINATIONS)
def test_fast_merge_matches_peft_add_weighted_adapter(monkeypatch, combination_type):
    _compare_with_peft(monkeypatch, _tiny_peft(), combination_type, density=0.5)


@pytest.mark.parametrize("combination_type", ["svd", "dare_ties_svd"])
def test_fast_merge_with_rank_and_clamp(monkeypatch, combination_type):
    _compare_with_peft(monkeypatch, _tiny_peft(), combination_type, density=0.7, svd_rank=5, svd_clamp=0.95,
                       majority_sign_method="frequency")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_merge_low_precision_model(monkeypatch, dtype):
    _compare_with_peft(monkeypatch, _tiny_peft(dtype), "dare_linear_svd", density=0.5)


def test_fast_merge_embedding_layer(monkeypatch):
    """Embeddings: PEFT prunes the transposed delta; DARE's masks are drawn in that layout."""
    _compare_with_peft(monkeypatch, _tiny_peft(target_modules=("embed_tokens", "q_proj")), "dare_ties_svd",
                       density=0.5)


def test_fast_merge_fan_in_fan_out_layer(monkeypatch):
    """GPT-2's Conv1D (fan_in_fan_out=True)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=48, n_head=4, vocab_size=100, n_positions=32)).eval()
    peft_model = None
    for i, r in enumerate((4, 2, 5)):
        config = peft.LoraConfig(r=r, lora_alpha=r, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                 init_lora_weights=False)
        if peft_model is None:
            peft_model = peft.get_peft_model(model, config, adapter_name="a0")
        else:
            peft_model.add_adapter(f"a{i}", config)
    _compare_with_peft(monkeypatch, peft_model, "dare_linear_svd", density=0.6)


def test_fast_merge_adapter_saves_and_loads(monkeypatch, tmp_path):
    from lolakernels.models import tiny_llama

    patched = _compare_with_peft(monkeypatch, _tiny_peft(), "ties_svd", density=0.5)
    patched.set_adapter("merged")
    patched.save_pretrained(tmp_path, selected_adapters=["merged"])
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "merged").eval()
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = patched(tokens).logits
        got = loaded(tokens).logits
        base = tiny_llama()(tokens).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (expected - base).abs().max() > 1e-3  # the merged adapter does change the output


def test_fast_merge_restores_and_is_idempotent():
    from lolakernels.peft import fast_merge

    peft_model = _tiny_peft()
    lora_model = peft_model.base_model
    handle = fast_merge(peft_model)
    assert fast_merge(lora_model) is handle and handle.active
    assert "add_weighted_adapter" in lora_model.__dict__
    handle.restore()
    assert "add_weighted_adapter" not in lora_model.__dict__ and not handle.active
    handle.restore()
    # Other combination types and single adapters go to PEFT untouched.
    with fast_merge(peft_model) as handle:
        peft_model.add_weighted_adapter(["a0", "a1"], [0.5, 0.5], "cat", combination_type="cat")
        peft_model.add_weighted_adapter(["a0"], [0.5], "single", combination_type="svd")
    assert handle.merged_weights == 0 and "cat" in peft_model.peft_config


def test_fast_merge_rejects_bad_input_before_creating_the_adapter():
    from lolakernels.peft import fast_merge

    with pytest.raises(TypeError, match="model must be a peft PeftModel or LoraModel"):
        fast_merge(torch.nn.Linear(3, 3))
    peft_model = _tiny_peft()
    with fast_merge(peft_model):
        with pytest.raises(ValueError, match="density is required"):
            peft_model.add_weighted_adapter(["a0", "a1"], [0.5, 0.5], "bad", combination_type="ties_svd")
    assert "bad" not in peft_model.peft_config
