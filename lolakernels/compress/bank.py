"""AdapterBank: a collection of LoRA adapters compressed onto shared bases, per adapted module.

For each slot (an adapted ``nn.Linear``, named by its path in the base model, e.g.
``"model.layers.0.self_attn.q_proj"``) the bank holds C bases and one small core per adapter:

    delta_i = lora_b[c] @ Σ_i @ lora_a[c],    c = basis_of[i]

Shapes: ``lora_a [C, R, d_in]``, ``lora_b [C, d_out, R]``, ``sigma [N, R]`` (diagonal Σ_i:
methods jd-diag, svd, ties) or ``[N, R, R]`` (full Σ_i: jd-full), ``basis_of [N]`` int32. PEFT's
scaling (``alpha / r`` or ``alpha / sqrt(r)``) is already folded in, so these are exactly the
arguments of :func:`lolakernels.shared_basis_lora` with ``scale=1``.

Methods: ``jd-full`` / ``jd-diag`` (joint diagonalisation, C ≥ 1 clusters), ``svd`` (one basis per
adapter: C = N, ``basis_of = arange(N)``), ``ties`` (one merged delta for every adapter: C = 1,
Σ_i = I).

The file format is one safetensors file: tensors ``slot.{j}.lora_a|lora_b|sigma|basis_of|error``
for the j-th slot, and string metadata (``format``, ``format_version``, ``method``, ``rank``,
``base_model``, ``target_modules``, ``adapter_names``, ``slots``, ``task_type``, ``fit``), the
structured fields as JSON. No pickle.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor

FORMAT_NAME = "lolakernels-adapter-bank"
FORMAT_VERSION = 1
METHODS = ("jd-full", "jd-diag", "svd", "ties")
FULL_SIGMA_METHODS = ("jd-full",)
ADAPTER_FILE = "adapter_model.safetensors"


class SlotWeights(NamedTuple):
    """The layout of :func:`lolakernels.shared_basis_lora` for one slot.

    ``lora_a [C, R, d_in]``, ``lora_b [C, d_out, R]``, ``sigma [N, R]`` or ``[N, R, R]``,
    ``basis_of [N]`` int32: adapter i's delta is ``lora_b[c] @ Σ_i @ lora_a[c]``, c = basis_of[i].
    """

    lora_a: Tensor
    lora_b: Tensor
    sigma: Tensor
    basis_of: Tensor


@dataclass(frozen=True)
class ReconstructionErrors:
    """Squared relative Frobenius error ``‖M_i − delta_i‖² / ‖M_i‖²`` per adapter × slot
    (``values [N, S]`` float64, rows in ``adapter_names`` order, columns in ``slots`` order; an
    adapter whose delta is zero in a slot counts 0 there)."""

    adapter_names: list[str]
    slots: list[str]
    values: Tensor

    def __getitem__(self, key: tuple[str, str]) -> float:
        name, slot = key
        return float(self.values[self.adapter_names.index(name), self.slots.index(slot)])

    def mean(self) -> float:
        return float(self.values.mean()) if self.values.numel() else 0.0

    def by_adapter(self) -> dict[str, float]:
        return {name: float(self.values[i].mean()) for i, name in enumerate(self.adapter_names)}

    def by_slot(self) -> dict[str, float]:
        return {slot: float(self.values[:, j].mean()) if self.values.shape[0] else 0.0
                for j, slot in enumerate(self.slots)}

    def _grouped(self, key_of) -> dict[str, float]:
        groups: dict[str, list[int]] = {}
        for j, slot in enumerate(self.slots):
            groups.setdefault(key_of(slot), []).append(j)
        return {key: float(self.values[:, columns].mean()) if self.values.shape[0] else 0.0
                for key, columns in groups.items()}

    def by_module(self) -> dict[str, float]:
        """Mean over adapters and layers, per module name (``q_proj``, ``down_proj``, ...)."""
        return self._grouped(lambda slot: slot.rsplit(".", 1)[-1])

    def by_layer(self) -> dict[str, float]:
        """Mean over adapters and modules, per layer (the first path component that is a number,
        with everything before it: ``model.layers.3``); slots outside numbered layers group as is."""
        def layer_of(slot: str) -> str:
            match = re.match(r"^(.*?\.\d+)(\.|$)", slot)
            return match.group(1) if match else slot
        return self._grouped(layer_of)

    def to_markdown(self) -> str:
        """One row per adapter, one column per slot, plus a mean column and a mean row."""
        header = "| adapter | " + " | ".join(self.slots) + " | mean |"
        lines = [header, "|" + "---|" * (len(self.slots) + 2)]
        for i, name in enumerate(self.adapter_names):
            cells = " | ".join(f"{float(v):.3g}" for v in self.values[i])
            lines.append(f"| {name} | {cells} | {float(self.values[i].mean()):.3g} |")
        means = self.by_slot()
        lines.append("| mean | " + " | ".join(f"{means[s]:.3g}" for s in self.slots) + f" | {self.mean():.3g} |")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()


class AdapterBank:
    """Compressed adapters on shared per-slot bases (see the module docstring for the math).

    Build one with :func:`lolakernels.compress_adapters` or :meth:`AdapterBank.load`.

    Attributes:
        adapter_names: adapter id i (the id given to kernels; -1 = no adapter) is the index here.
        slots: module paths relative to the base model; ``model.get_submodule(slot)`` is the
            adapted ``nn.Linear``.
        rank: R, the rank of every basis.
        method: ``"jd-full"``, ``"jd-diag"``, ``"svd"`` or ``"ties"``.
        base_model: ``base_model_name_or_path`` of the adapters (or None).
        target_modules: sorted module names the adapters target (``["q_proj", "v_proj"]``).
        task_type: the adapters' PEFT ``task_type`` (or None), written into exported adapters.
        fit_log: what the fit recorded per slot (loss history per cluster, sweeps), JSON-able.
    """

    def __init__(self, *, method: str, rank: int, adapter_names: list[str], slot_weights: dict[str, SlotWeights],
                 errors: dict[str, Tensor], base_model: Optional[str], target_modules: list[str],
                 task_type: Optional[str] = None, fit_log: Optional[dict] = None):
        self.method = method
        self.rank = int(rank)
        self.adapter_names = list(adapter_names)
        self.slots = list(slot_weights)
        self.base_model = base_model
        self.target_modules = sorted(target_modules)
        self.task_type = task_type
        self.fit_log = fit_log if fit_log is not None else {}
        self._weights = dict(slot_weights)
        self._errors = {slot: errors[slot].to(torch.float64) for slot in self.slots} if errors else {}
        _check_consistent(self)

    # ----------------------------------------------------------------- contract surface
    def __repr__(self) -> str:
        return (f"AdapterBank(method={self.method!r}, rank={self.rank}, adapters={len(self.adapter_names)}, "
                f"slots={len(self.slots)}, base_model={self.base_model!r})")

    def __len__(self) -> int:
        return len(self.adapter_names)

    def _slot(self, slot: str) -> SlotWeights:
        if not isinstance(slot, str):
            raise TypeError(f"slot must be a str (a module path such as 'model.layers.0.self_attn.q_proj'), "
                            f"got {type(slot).__name__}")
        if slot not in self._weights:
            shown = ", ".join(self.slots[:4]) + (", ..." if len(self.slots) > 4 else "")
            raise ValueError(f"slot {slot!r} is not in this bank (it has {len(self.slots)} slots: {shown})")
        return self._weights[slot]

    def _index(self, name: str) -> int:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str (an adapter name), got {type(name).__name__}")
        try:
            return self.adapter_names.index(name)
        except ValueError:
            raise ValueError(f"name {name!r} is not an adapter of this bank (adapters: {self.adapter_names})") from None

    def num_clusters(self, slot: str) -> int:
        """C, the number of bases of this slot."""
        return self._slot(slot).lora_a.shape[0]

    def slot_shape(self, slot: str) -> tuple[int, int]:
        """(d_out, d_in) of the adapted linear layer."""
        weights = self._slot(slot)
        return weights.lora_b.shape[1], weights.lora_a.shape[2]

    def slot_weights(self, slot: str, *, dtype: torch.dtype = torch.float32,
                     device: Union[str, torch.device, None] = None) -> SlotWeights:
        """The slot's bases and cores in the layout of :func:`lolakernels.shared_basis_lora`
        (fresh contiguous tensors in ``dtype`` on ``device``; basis_of stays int32)::

            w = bank.slot_weights(slot)
            lolakernels.shared_basis_lora(x, w.lora_a, w.lora_b, w.sigma, ids, basis_of=w.basis_of, out=y)

        adds ``x @ delta_{ids[t]}ᵀ`` to every row of y (ids index ``adapter_names``).
        """
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        weights = self._slot(slot)
        float_part = [t.to(device=device, dtype=dtype, copy=True).contiguous() for t in weights[:3]]
        return SlotWeights(*float_part, weights.basis_of.to(device=device, copy=True).contiguous())

    def cluster_of(self, name: str, slot: str) -> int:
        """Index of the basis adapter ``name`` uses in ``slot``."""
        return int(self._slot(slot).basis_of[self._index(name)])

    def core(self, name: str, slot: str) -> Tensor:
        """Σ_i of adapter ``name`` in ``slot`` as a dense ``[R, R]`` fp32 tensor."""
        sigma = self._slot(slot).sigma[self._index(name)]
        return sigma.clone() if sigma.dim() == 2 else torch.diag(sigma)

    def delta(self, name: str, slot: str) -> Tensor:
        """The stored delta ``lora_b[c] @ Σ_i @ lora_a[c]`` as a dense ``[d_out, d_in]`` fp32
        tensor (scaling folded in; for small shapes and tests)."""
        weights = self._slot(slot)
        index = self._index(name)
        cluster = int(weights.basis_of[index])
        return weights.lora_b[cluster] @ self.core(name, slot) @ weights.lora_a[cluster]

    def reconstruction_error(self) -> ReconstructionErrors:
        """Squared relative Frobenius error of each adapter × slot against the adapter it came
        from, as recorded when it was fitted or added."""
        if not self.slots:
            values = torch.zeros(len(self.adapter_names), 0, dtype=torch.float64)
        else:
            values = torch.stack([self._errors[slot] for slot in self.slots], dim=1)
        return ReconstructionErrors(list(self.adapter_names), list(self.slots), values)

    # ----------------------------------------------------------------- editing
    def add_adapter(self, name: str, adapter: Any) -> None:
        """Adds an adapter by projecting it onto the frozen bases (no refit).

        ``adapter``: a PEFT adapter directory, or ``(LoraConfig or its dict, state dict)``. It
        must match the bank's base model, slots and shapes (else ``ValueError``).
        Per slot, with ``M = s·B A``: jd-full ``Σ = U_cᵀ M V_c`` on the basis c that reconstructs
        it best; jd-diag ``σ`` from ``((U_cᵀU_c) ⊙ (V_cᵀV_c)) σ = diag(U_cᵀ M V_c)``, best c; svd a
        new basis from its own rank-R truncated SVD; ties the shared merged delta (Σ = I).
        """
        from . import joint
        from .adapters import read_adapter

        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if name in self.adapter_names:
            raise ValueError(f"name {name!r} is already an adapter of this bank; remove_adapter it first")
        loaded = read_adapter(name, adapter)
        joint.check_matches_bank(loaded, self)
        new_weights, new_errors = {}, {}
        for slot in self.slots:
            new_weights[slot], new_errors[slot] = joint.project_onto_slot(self.method, self._weights[slot], loaded,
                                                                          slot)
        self._weights = new_weights
        self._errors = {slot: torch.cat([self._errors[slot], new_errors[slot].reshape(1)]) for slot in self.slots}
        self.adapter_names.append(name)

    def remove_adapter(self, name: str) -> None:
        """Removes an adapter; later adapters' ids shift down by one. With method svd its basis goes
        too (C = N stays true); with clusters, a basis may end up serving no adapter (it is kept)."""
        index = self._index(name)
        keep = [i for i in range(len(self.adapter_names)) if i != index]
        keep_index = torch.tensor(keep, dtype=torch.long)
        for slot in self.slots:
            weights = self._weights[slot]
            lora_a, lora_b, basis_of = weights.lora_a, weights.lora_b, weights.basis_of[keep_index]
            if self.method == "svd":
                lora_a, lora_b = lora_a[keep_index], lora_b[keep_index]
                basis_of = torch.arange(len(keep), dtype=torch.int32)
            self._weights[slot] = SlotWeights(lora_a.contiguous(), lora_b.contiguous(),
                                              weights.sigma[keep_index].contiguous(), basis_of.contiguous())
            self._errors[slot] = self._errors[slot][keep_index]
        del self.adapter_names[index]

    # ----------------------------------------------------------------- PEFT export
    def export_peft(self, name: str, out_dir: Union[str, os.PathLike]) -> Path:
        """Writes adapter ``name`` as a standard PEFT LoRA adapter of rank R into ``out_dir``
        (``adapter_config.json`` + ``adapter_model.safetensors``, each written to a temporary file
        and renamed).

        Per slot: ``lora_A = lora_a[c]`` ``[R, d_in]``, ``lora_B = lora_b[c] @ Σ_i`` ``[d_out, R]``,
        and ``lora_alpha = r = R`` so PEFT's scaling is 1 and ``B A`` is the bank's delta.
        ``target_modules`` lists the slot paths, so PEFT adapts exactly these modules.
        """
        import peft
        from safetensors.torch import save_file

        index = self._index(name)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for slot in self.slots:
            weights = self._weights[slot]
            cluster = int(weights.basis_of[index])
            tensors[f"base_model.model.{slot}.lora_A.weight"] = weights.lora_a[cluster].contiguous()
            lora_b = weights.lora_b[cluster] @ self.core(name, slot)
            tensors[f"base_model.model.{slot}.lora_B.weight"] = lora_b.contiguous()
        config = peft.LoraConfig(r=self.rank, lora_alpha=self.rank, target_modules=list(self.slots),
                                 base_model_name_or_path=self.base_model, task_type=self.task_type)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as staging:
            config.save_pretrained(staging)
            save_file(tensors, os.path.join(staging, ADAPTER_FILE), metadata={"format": "pt"})
            # safetensors writes 0600; give the weights the mode open() gave the config file
            os.chmod(os.path.join(staging, ADAPTER_FILE),
                     stat.S_IMODE(os.stat(os.path.join(staging, "adapter_config.json")).st_mode))
            for file_name in ("adapter_config.json", ADAPTER_FILE):
                os.replace(os.path.join(staging, file_name), out_dir / file_name)
        return out_dir

    # ----------------------------------------------------------------- file format
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Writes the bank to one safetensors file (temporary file in the same folder, then renamed)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors, storages = {}, set()

        def own_copy(tensor: Tensor) -> Tensor:
            # safetensors refuses tensors that share memory (one sigma used by two slots of a
            # hand-built bank): the second user of a storage is written from a copy.
            tensor = tensor.contiguous()
            storage = tensor.untyped_storage().data_ptr()
            if storage in storages and tensor.numel():
                return tensor.clone()
            storages.add(storage)
            return tensor

        for j, slot in enumerate(self.slots):
            for field, tensor in self._weights[slot]._asdict().items():
                tensors[f"slot.{j}.{field}"] = own_copy(tensor)
            tensors[f"slot.{j}.error"] = own_copy(self._errors[slot])
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "method": self.method,
            "rank": str(self.rank),
            "base_model": json.dumps(self.base_model),
            "target_modules": json.dumps(self.target_modules),
            "adapter_names": json.dumps(self.adapter_names),
            "slots": json.dumps(self.slots),
            "task_type": json.dumps(self.task_type),
            "fit": json.dumps(self.fit_log),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = _new_staging_file(path)
        try:
            # safetensors writes the file 0600 whatever it replaces: restore the mode open() gave the
            # staging file (0666 under the umask), or that of the file being replaced.
            mode = stat.S_IMODE(os.stat(path if path.exists() else staging).st_mode)
            save_file(tensors, staging, metadata=metadata)
            os.chmod(staging, mode)
            with open(staging, "rb") as written:
                os.fsync(written.fileno())  # on disk before it replaces the old file
            os.replace(staging, path)
        except BaseException:
            if os.path.exists(staging):
                os.unlink(staging)
            raise
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "AdapterBank":
        """Reads and validates a bank file; a truncated, corrupt or inconsistent file raises
        ``ValueError`` saying what is wrong."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"path {str(path)!r} is not a file")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata()
            tensors = load_file(str(path))
        except (SafetensorError, OSError, RuntimeError, ValueError) as error:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None
        return cls._from_parts(metadata, tensors, str(path))

    @classmethod
    def _from_parts(cls, metadata: Optional[dict], tensors: dict[str, Tensor], where: str) -> "AdapterBank":
        if not metadata or metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"{where} is not an adapter bank: its metadata has no format = {FORMAT_NAME!r}")
        version = metadata.get("format_version")
        if version != str(FORMAT_VERSION):
            raise ValueError(f"{where}: format_version {version!r} is not supported "
                             f"(this library reads {FORMAT_VERSION})")

        def field(key: str, check, expected: str):
            if key not in metadata:
                raise ValueError(f"{where}: metadata field {key!r} is missing")
            raw = metadata[key]
            try:
                value = raw if key in ("method", "rank") else json.loads(raw)
            except json.JSONDecodeError:
                raise ValueError(f"{where}: metadata field {key!r} is not valid JSON: {raw[:80]!r}") from None
            if not check(value):
                raise ValueError(f"{where}: metadata field {key!r} must be {expected}, got {raw[:80]!r}")
            return value

        is_str_list = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)  # noqa: E731
        method = field("method", lambda v: v in METHODS, f"one of {METHODS}")
        rank = field("rank", lambda v: v.isascii() and v.isdigit() and int(v) > 0, "a positive integer")
        base_model = field("base_model", lambda v: v is None or isinstance(v, str), "a string or null")
        target_modules = field("target_modules", is_str_list, "a list of strings")
        names = field("adapter_names", is_str_list, "a list of strings")
        slots = field("slots", is_str_list, "a list of strings")
        task_type = field("task_type", lambda v: v is None or isinstance(v, str), "a string or null")
        fit_log = field("fit", lambda v: isinstance(v, dict), "a JSON object") if "fit" in metadata else {}
        if len(set(slots)) != len(slots):
            raise ValueError(f"{where}: metadata field 'slots' names a slot twice: "
                             f"{sorted({s for s in slots if slots.count(s) > 1})[:4]}")
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"{where}: metadata field 'adapter_names' must hold distinct, non-empty names")
        expected_keys = {f"slot.{j}.{part}" for j in range(len(slots))
                         for part in ("lora_a", "lora_b", "sigma", "basis_of", "error")}
        missing, extra = expected_keys - set(tensors), set(tensors) - expected_keys
        if missing or extra:
            raise ValueError(f"{where}: tensors do not match the {len(slots)} slots of the metadata "
                             f"(missing {sorted(missing)[:4]}, unexpected {sorted(extra)[:4]})")
        slot_weights, errors = {}, {}
        for j, slot in enumerate(slots):
            slot_weights[slot] = SlotWeights(*(tensors[f"slot.{j}.{part}"] for part in
                                               ("lora_a", "lora_b", "sigma", "basis_of")))
            errors[slot] = tensors[f"slot.{j}.error"]
        try:
            return cls(method=method, rank=int(rank), adapter_names=names, slot_weights=slot_weights, errors=errors,
                       base_model=base_model, target_modules=target_modules, task_type=task_type, fit_log=fit_log)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{where}: inconsistent adapter bank: {error}") from None


def _new_staging_file(path: Path) -> str:
    """A new, empty file beside ``path`` for an atomic replace, created as open() creates files
    (0666 under the umask, where tempfile.mkstemp gives 0600)."""
    for _ in range(100):
        staging = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(staging, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return staging
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def _check_consistent(bank: AdapterBank) -> None:
    """Every invariant of the bank; raises ValueError naming the field that breaks one."""
    if bank.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {bank.method!r}")
    if bank.rank <= 0:
        raise ValueError(f"rank must be positive, got {bank.rank}")
    if len(set(bank.adapter_names)) != len(bank.adapter_names):
        raise ValueError(f"adapter_names has duplicates: {bank.adapter_names}")
    if len(set(bank.slots)) != len(bank.slots):
        raise ValueError("slots has duplicates")
    num_adapters, rank = len(bank.adapter_names), bank.rank
    for slot in bank.slots:
        lora_a, lora_b, sigma, basis_of = bank._weights[slot]
        what = f"slot {slot!r}"
        for field_name, tensor in (("lora_a", lora_a), ("lora_b", lora_b), ("sigma", sigma)):
            if not isinstance(tensor, Tensor) or tensor.dtype != torch.float32:
                raise ValueError(f"{what}: {field_name} must be a float32 tensor")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{what}: {field_name} holds non-finite values")
        if lora_a.dim() != 3 or lora_b.dim() != 3 or lora_a.shape[1] != rank or lora_b.shape[2] != rank:
            raise ValueError(f"{what}: lora_a must be [C, R={rank}, d_in] and lora_b [C, d_out, R={rank}], "
                             f"got {list(lora_a.shape)} and {list(lora_b.shape)}")
        num_clusters = lora_a.shape[0]
        if lora_b.shape[0] != num_clusters:
            raise ValueError(f"{what}: lora_a has {lora_a.shape[0]} bases, lora_b {lora_b.shape[0]}")
        if bank.method == "svd" and num_clusters != num_adapters:
            raise ValueError(f"{what}: method svd needs C = N = {num_adapters} bases, got {num_clusters}")
        if bank.method != "svd" and num_clusters == 0:
            raise ValueError(f"{what}: lora_a holds no basis")
        sigma_shape = [num_adapters, rank, rank] if bank.method in FULL_SIGMA_METHODS else [num_adapters, rank]
        if list(sigma.shape) != sigma_shape:
            raise ValueError(f"{what}: sigma must be {sigma_shape} for method {bank.method} and "
                             f"{num_adapters} adapters, got {list(sigma.shape)}")
        if not isinstance(basis_of, Tensor) or basis_of.dtype != torch.int32 or list(basis_of.shape) != [num_adapters]:
            raise ValueError(f"{what}: basis_of must be an int32 tensor [{num_adapters}]")
        if num_adapters and (int(basis_of.min()) < 0 or int(basis_of.max()) >= num_clusters):
            raise ValueError(f"{what}: basis_of has values outside [0, {num_clusters})")
        if bank.method == "svd" and not torch.equal(basis_of, torch.arange(num_adapters, dtype=torch.int32)):
            raise ValueError(f"{what}: method svd needs one basis per adapter (basis_of = arange(N), C = N)")
        if bank.method == "ties" and num_clusters != 1:
            raise ValueError(f"{what}: method ties has one merged basis, got {num_clusters}")
        if bank._errors:
            error = bank._errors.get(slot)
            if error is None or list(error.shape) != [num_adapters] or not bool(torch.isfinite(error).all()) \
                    or (error.numel() and float(error.min()) < 0):
                raise ValueError(f"{what}: error must hold {num_adapters} finite non-negative values")
    if not bank._errors and bank.slots:
        raise ValueError("errors must be given for every slot")
