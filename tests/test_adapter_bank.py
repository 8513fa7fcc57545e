"""AdapterBank with real PEFT adapters of a small Llama: slots and scaling as PEFT defines them,
the shared_basis_lora layout, export -> PEFT load -> same delta, save/load, add/remove, refusals."""
import copy
import json
import os
import re
import stat

import pytest
import torch

import lolakernels
from lolakernels.compress.bank import AdapterBank, SlotWeights
from lolakernels.reference import joint_compression as dense

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]
ADAPTERS = {  # name -> LoraConfig arguments (ranks, alphas, rsLoRA and patterns all differ)
    "alpha": dict(r=4, lora_alpha=8),
    "beta": dict(r=8, lora_alpha=8, use_rslora=True),
    "gamma": dict(r=6, lora_alpha=12, rank_pattern={"layers.1.self_attn.v_proj": 2}, alpha_pattern={"down_proj": 3}),
    "delta": dict(r=4, lora_alpha=16),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small shapes: BLAS threads only add synchronisation, and on a busy machine they stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_model():
    from lolakernels.models import tiny_llama

    return tiny_llama(seed=0)


def _save_adapter(base_model, folder, name, arguments, seed):
    model = peft.get_peft_model(copy.deepcopy(base_model), peft.LoraConfig(**{"target_modules": TARGETS, **arguments}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_" in parameter_name:  # PEFT starts lora_B at zero: give every adapter a real delta
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.save_pretrained(folder / name)
    # PEFT records the base model's name_or_path, which a model built in memory lacks.
    config_path = folder / name / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "tiny-random-llama"
    config_path.write_text(json.dumps(config))
    return folder / name


@pytest.fixture(scope="module")
def adapter_dirs(base_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return {name: _save_adapter(base_model, folder, name, arguments, seed)
            for seed, (name, arguments) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def peft_deltas(base_model, adapter_dirs):
    """(name, slot) -> PEFT's own get_delta_weight, with every adapter loaded by PEFT."""
    names = list(adapter_dirs)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    deltas = {}
    for module_name, module in model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.Linear):
            for name in names:
                deltas[(name, module_name)] = module.get_delta_weight(name).detach().float()
    return deltas


@pytest.fixture(scope="module")
def banks(adapter_dirs):
    dirs = list(adapter_dirs.values())
    return {
        "jd-full": lolakernels.compress_adapters(dirs, 6, method="jd-full", clusters=2, progress=False),
        "jd-diag": lolakernels.compress_adapters(dirs, 6, method="jd-diag", progress=False),
        "svd": lolakernels.compress_adapters(dirs, 8, method="svd", progress=False),
        "ties": lolakernels.compress_adapters(dirs, 6, method="ties", density=0.5, progress=False),
    }


def test_slots_name_the_adapted_linear_layers(banks, base_model, peft_deltas):
    bank = banks["jd-full"]
    assert bank.adapter_names == list(ADAPTERS)
    assert bank.target_modules == sorted(TARGETS)
    assert bank.base_model == "tiny-random-llama"
    assert bank.rank == 6 and bank.method == "jd-full"
    assert sorted(bank.slots) == sorted({slot for _, slot in peft_deltas})
    assert bank.slots[0].startswith("model.layers.0.") and bank.slots[-1].startswith("model.layers.1.")
    for slot in bank.slots:
        linear = base_model.get_submodule(slot)
        assert isinstance(linear, torch.nn.Linear)
        assert bank.slot_shape(slot) == (linear.out_features, linear.in_features)
        assert 1 <= bank.num_clusters(slot) <= 2


def test_svd_bank_reproduces_peft_deltas_exactly(banks, peft_deltas):
    """Rank 8 holds every adapter: the bank's deltas are PEFT's own (scaling, rsLoRA, patterns)."""
    bank = banks["svd"]
    for (name, slot), expected in peft_deltas.items():
        torch.testing.assert_close(bank.delta(name, slot), expected, rtol=1e-5, atol=1e-5)
    assert float(bank.reconstruction_error().values.max()) < 1e-10


@pytest.mark.parametrize("method", ["jd-full", "jd-diag", "svd", "ties"])
def test_reconstruction_errors_are_the_deltas_errors(banks, peft_deltas, method):
    bank = banks[method]
    table = bank.reconstruction_error()
    for (name, slot), expected in peft_deltas.items():
        difference = bank.delta(name, slot).double() - expected.double()
        error = float((difference ** 2).sum() / (expected.double() ** 2).sum())
        assert table[name, slot] == pytest.approx(error, rel=1e-3, abs=1e-7), (name, slot)


@pytest.mark.parametrize("method", ["jd-full", "jd-diag", "svd", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_weights_drive_shared_basis_lora(banks, method, dtype):
    bank = banks[method]
    slot = "model.layers.1.self_attn.v_proj"
    weights = bank.slot_weights(slot, dtype=dtype)
    assert isinstance(weights, SlotWeights)
    assert weights.lora_a.dtype == dtype and weights.basis_of.dtype == torch.int32
    assert weights.sigma.dim() == (3 if method == "jd-full" else 2)
    d_out, d_in = bank.slot_shape(slot)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, d_in, generator=generator)
    ids = torch.tensor([0, -1, 3, 1, 2, 2, 0], dtype=torch.int32)
    out = torch.zeros(7, d_out, dtype=dtype)
    lolakernels.shared_basis_lora(x.to(dtype), weights.lora_a, weights.lora_b, weights.sigma, ids,
                                  basis_of=weights.basis_of, scale=1.0, out=out)
    expected = torch.stack([x[t] @ bank.delta(bank.adapter_names[i], slot).T if i >= 0 else torch.zeros(d_out)
                            for t, i in enumerate(ids.tolist())])
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))


@pytest.mark.parametrize("method", ["jd-full", "jd-diag"])
def test_export_loads_in_peft_and_reproduces_the_delta(banks, base_model, tmp_path, method):
    bank = banks[method]
    name = "gamma"
    out_dir = bank.export_peft(name, tmp_path / "exported")
    assert sorted(os.listdir(out_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = peft.LoraConfig.from_pretrained(str(out_dir))
    assert config.r == config.lora_alpha == bank.rank
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), out_dir).eval()
    merged = copy.deepcopy(base_model)
    with torch.no_grad():
        for slot in bank.slots:
            layer = model.base_model.model.get_submodule(slot)
            assert isinstance(layer, peft.tuners.lora.Linear)
            torch.testing.assert_close(layer.get_delta_weight("default"), bank.delta(name, slot), rtol=1e-5, atol=1e-6)
            merged.get_submodule(slot).weight += bank.delta(name, slot)
        tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(model(tokens).logits, merged(tokens).logits, rtol=1e-4, atol=1e-4)
    # Only the bank's slots are adapted.
    adapted = {n for n, m in model.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.Linear)}
    assert adapted == set(bank.slots)


def _assert_same_bank(left, right):
    assert (left.method, left.rank, left.adapter_names, left.slots, left.base_model, left.target_modules,
            left.task_type) == (right.method, right.rank, right.adapter_names, right.slots, right.base_model,
                                right.target_modules, right.task_type)
    for slot in left.slots:
        for a, b in zip(left.slot_weights(slot), right.slot_weights(slot)):
            assert a.dtype == b.dtype and torch.equal(a, b), slot
    assert torch.equal(left.reconstruction_error().values, right.reconstruction_error().values)


@pytest.mark.parametrize("method", ["jd-full", "jd-diag", "svd", "ties"])
def test_save_load_round_trip(banks, tmp_path, method):
    bank = banks[method]
    path = bank.save(tmp_path / "bank.safetensors")
    loaded = AdapterBank.load(path)
    _assert_same_bank(bank, loaded)
    assert loaded.fit_log == json.loads(json.dumps(bank.fit_log))
    bank.save(path)  # overwriting replaces the file and leaves no temporary file behind
    assert os.listdir(tmp_path) == ["bank.safetensors"]


def test_saved_file_keeps_the_usual_permissions(banks, tmp_path):
    """A new bank file gets the mode open() gives (0666 under the umask); a replaced one keeps its own."""
    umask = os.umask(0o022)
    try:
        path = banks["jd-full"].save(tmp_path / "bank.safetensors")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        os.chmod(path, 0o640)
        banks["jd-full"].save(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        exported = banks["jd-full"].export_peft(banks["jd-full"].adapter_names[0], tmp_path / "exported")
        assert {stat.S_IMODE(os.stat(f).st_mode) for f in exported.iterdir()} == {0o644}
    finally:
        os.umask(umask)


def test_bank_whose_slots_share_tensors_saves_and_loads(banks, tmp_path):
    bank = banks["jd-full"]
    shared = copy.copy(bank)
    shared._weights = dict(bank._weights)
    first, second = bank.slots[0], bank.slots[1]
    shared._weights[second] = shared._weights[second]._replace(sigma=shared._weights[first].sigma)
    loaded = AdapterBank.load(shared.save(tmp_path / "shared.safetensors"))
    assert torch.equal(loaded._weights[second].sigma, bank._weights[first].sigma)
    assert torch.equal(loaded._weights[first].sigma, bank._weights[first].sigma)


def _rewrite(path, target, *, metadata=None, tensors=None, drop=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        old_metadata = handle.metadata()
        old_tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    old_metadata.update(metadata or {})
    old_tensors.update(tensors or {})
    for key in drop or ():
        old_tensors.pop(key)
    save_file(old_tensors, str(target), metadata=old_metadata)
    return target


def _write(target, data):
    target.write_bytes(data)
    return target


def _metadata_list(path, key, edit):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        values = json.loads(handle.metadata()[key])
    return json.dumps(edit(values))


def _slot_named_twice(path, target):
    return _rewrite(path, target, metadata={"slots": _metadata_list(path, "slots", lambda v: [v[0]] + v[:-1])})


def _adapter_named(path, target, name):
    return _rewrite(path, target, metadata={
        "adapter_names": _metadata_list(path, "adapter_names", lambda v: [v[0], name] + v[2:])})


@pytest.fixture
def saved(banks, tmp_path):
    return banks["jd-full"].save(tmp_path / "good.safetensors")


@pytest.mark.parametrize("corrupt,message", [
    (lambda p, t: _write(t, p.read_bytes()[:-100]), "is not a readable safetensors file"),
    (lambda p, t: _write(t, b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"), "is not a readable safetensors file"),
    (lambda p, t: _rewrite(p, t, metadata={"format": "something-else"}), "is not an adapter bank"),
    (lambda p, t: _rewrite(p, t, metadata={"format_version": "99"}), "format_version '99' is not supported"),
    (lambda p, t: _rewrite(p, t, metadata={"adapter_names": "[1, 2"}), "'adapter_names' is not valid JSON"),
    (lambda p, t: _rewrite(p, t, metadata={"rank": "-3"}), "'rank' must be a positive integer"),
    (lambda p, t: _rewrite(p, t, metadata={"rank": "\u00b2"}), "'rank' must be a positive integer"),
    (lambda p, t: _rewrite(p, t, metadata={"method": "magic"}), "'method' must be one of"),
    (_slot_named_twice, "'slots' names a slot twice"),
    (lambda p, t: _adapter_named(p, t, ""), "'adapter_names' must hold distinct, non-empty names"),
    (lambda p, t: _adapter_named(p, t, "alpha"), "'adapter_names' must hold distinct, non-empty names"),
    (lambda p, t: _rewrite(p, t, metadata={"adapter_names": '["alpha", "beta", "gamma"]'}),
     "sigma must be [3, 6, 6] for method jd-full and 3 adapters"),
    (lambda p, t: _rewrite(p, t, drop=["slot.2.lora_b"]), "tensors do not match the 6 slots"),
    (lambda p, t: _rewrite(p, t, tensors={"slot.0.basis_of": torch.tensor([0, 5, 0, 1], dtype=torch.int32)}),
     "basis_of has values outside"),
    (lambda p, t: _rewrite(p, t, tensors={"slot.0.basis_of": torch.zeros(4, dtype=torch.int64)}),
     "basis_of must be an int32 tensor [4]"),
    (lambda p, t: _rewrite(p, t, tensors={"slot.1.sigma": torch.full((4, 6, 6), float("nan"))}), "non-finite"),
    (lambda p, t: _rewrite(p, t, tensors={"slot.1.lora_a": torch.zeros(2, 5, 64)}), "lora_a must be [C, R=6, d_in]"),
    (lambda p, t: _rewrite(p, t, tensors={"slot.1.error": torch.zeros(3, dtype=torch.float64)}), "error must hold 4"),
])
def test_load_refuses_truncated_corrupt_or_inconsistent_files(saved, tmp_path, corrupt, message):
    target = corrupt(saved, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=re.escape(message)):
        AdapterBank.load(target)
    with pytest.raises(ValueError, match="is not a file"):
        AdapterBank.load(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("method", ["jd-full", "jd-diag", "svd", "ties"])
def test_adding_an_adapter_already_in_the_bank_gives_its_stored_sigma(banks, adapter_dirs, method):
    bank = copy.deepcopy(banks[method])
    bank.add_adapter("alpha again", adapter_dirs["alpha"])
    assert bank.adapter_names[-1] == "alpha again"
    errors = bank.reconstruction_error()
    for slot in bank.slots:
        torch.testing.assert_close(bank.core("alpha again", slot), bank.core("alpha", slot), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bank.delta("alpha again", slot), bank.delta("alpha", slot), rtol=1e-4, atol=1e-5)
        if method != "svd":
            assert bank.cluster_of("alpha again", slot) == bank.cluster_of("alpha", slot)
        assert errors["alpha again", slot] == pytest.approx(errors["alpha", slot], rel=1e-3, abs=1e-7)
    bank.remove_adapter("alpha again")
    _assert_same_bank(bank, banks[method])


def test_adding_a_new_adapter_projects_it_onto_the_frozen_bases(banks, base_model, tmp_path):
    bank = copy.deepcopy(banks["jd-full"])
    before = {slot: bank.slot_weights(slot) for slot in bank.slots}
    new_dir = _save_adapter(base_model, tmp_path, "epsilon", dict(r=5, lora_alpha=7), seed=99)
    bank.add_adapter("epsilon", new_dir)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), new_dir)
    for slot in bank.slots:
        weights = bank.slot_weights(slot)
        assert torch.equal(weights.lora_a, before[slot].lora_a) and torch.equal(weights.lora_b, before[slot].lora_b)
        delta = loaded.base_model.model.get_submodule(slot).get_delta_weight("default").detach().double()[None]
        # The oracle: Uᵀ M V on every basis, keep the best.
        candidates = []
        for cluster in range(bank.num_clusters(slot)):
            left, right = weights.lora_b[cluster].double(), weights.lora_a[cluster].double().T
            core = dense.full_cores(delta, left, right)
            candidates.append((float(dense.relative_errors(delta, left, core, right)), cluster, core[0]))
        error, cluster, core = min(candidates, key=lambda c: c[0])
        assert bank.cluster_of("epsilon", slot) == cluster
        torch.testing.assert_close(bank.core("epsilon", slot).double(), core, rtol=1e-4, atol=1e-5)
        assert bank.reconstruction_error()["epsilon", slot] == pytest.approx(error, rel=1e-4, abs=1e-8)


def test_remove_adapter_shifts_ids(banks):
    bank = copy.deepcopy(banks["svd"])
    slot = bank.slots[0]
    kept = {name: bank.delta(name, slot) for name in ("alpha", "gamma", "delta")}
    bank.remove_adapter("beta")
    assert bank.adapter_names == ["alpha", "gamma", "delta"]
    assert bank.num_clusters(slot) == 3
    assert bank.slot_weights(slot).basis_of.tolist() == [0, 1, 2]
    for name, delta in kept.items():
        assert torch.equal(bank.delta(name, slot), delta)
    assert bank.reconstruction_error().values.shape == (3, len(bank.slots))


def test_refusals_of_the_bank(banks, adapter_dirs, base_model, tmp_path):
    bank = copy.deepcopy(banks["jd-full"])
    with pytest.raises(ValueError, match="name 'alpha' is already an adapter of this bank"):
        bank.add_adapter("alpha", adapter_dirs["beta"])
    other = _save_adapter(base_model, tmp_path, "other", dict(r=4, lora_alpha=8), seed=5)
    config_path = other / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "another-model"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="adapter 'other' targets base model 'another-model' but the bank holds"):
        bank.add_adapter("other", other)
    narrow = _save_adapter(base_model, tmp_path, "narrow", dict(r=4, target_modules=["q_proj"]), seed=6)
    with pytest.raises(ValueError, match="adapter 'narrow' has no slot 'model.layers.0.mlp.down_proj', which the bank"):
        bank.add_adapter("narrow", narrow)
    assert bank.adapter_names == list(ADAPTERS)  # nothing was added by the refused calls
    with pytest.raises(ValueError, match="name 'nobody' is not an adapter of this bank"):
        bank.remove_adapter("nobody")
    with pytest.raises(ValueError, match="slot 'model.layers.9.mlp.up_proj' is not in this bank"):
        bank.delta("alpha", "model.layers.9.mlp.up_proj")
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        bank.slot_weights(bank.slots[0], dtype=torch.int32)
    with pytest.raises(TypeError, match="slot must be a str"):
        bank.num_clusters(0)
    with pytest.raises(ValueError, match="name 'nobody' is not an adapter of this bank"):
        bank.export_peft("nobody", tmp_path / "x")


def test_reconstruction_error_table(banks):
    bank = banks["jd-full"]
    table = bank.reconstruction_error()
    assert table.values.shape == (4, 6) and table.values.dtype == torch.float64
    assert set(table.by_module()) == set(TARGETS)
    assert set(table.by_layer()) == {"model.layers.0", "model.layers.1"}
    assert table.by_adapter()["beta"] == pytest.approx(float(table.values[1].mean()))
    assert table.mean() == pytest.approx(float(table.values.mean()))
    markdown = table.to_markdown()
    assert markdown.count("\n") == 4 + 3 and "| gamma |" in markdown


def test_cli_compress_info_export(adapter_dirs, tmp_path, capsys, base_model):
    from lolakernels.cli import main

    out = tmp_path / "bank.safetensors"
    assert main(["compress", *map(str, adapter_dirs.values()), "--rank", "4", "--method", "jd-full",
                 "--clusters", "2", "-o", str(out), "--quiet"]) == 0
    bank = AdapterBank.load(out)
    assert bank.adapter_names == list(ADAPTERS) and bank.rank == 4
    capsys.readouterr()
    assert main(["bank", "info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "jd-full" in printed and "tiny-random-llama" in printed and "gamma" in printed and "q_proj" in printed
    assert main(["bank", "export", str(out), "beta", str(tmp_path / "beta")]) == 0
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "beta")
    slot = bank.slots[1]
    torch.testing.assert_close(model.base_model.model.get_submodule(slot).get_delta_weight("default"),
                               bank.delta("beta", slot), rtol=1e-5, atol=1e-6)
    assert main(["bank", "export", str(out), "nobody", str(tmp_path / "x")]) == 2
    assert "name 'nobody' is not an adapter" in capsys.readouterr().err
    assert main(["compress", str(adapter_dirs["alpha"]), "--rank", "99", "-o", str(tmp_path / "b.safetensors"),
                 "--quiet"]) == 2
    assert "rank=99 exceeds" in capsys.readouterr().err
