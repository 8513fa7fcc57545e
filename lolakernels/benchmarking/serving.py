"""Serving benchmark: tokens/s of mixed-batch greedy generation on SmolLM2-135M-Instruct.

For each (dtype, N adapters) a batch of B sequences, sequence s using adapter ``s mod N``, is
generated three ways in the same run:

  peft        PEFT's mixed batch (``generate(adapter_names=...)``) on N PEFT LoRA adapters
  accelerate  the same PeftModel after ``lolakernels.peft.accelerate`` (one multi_lora launch per layer)
  bank        the base model with ``lolakernels.peft.attach_bank`` serving a JD-Full bank of the N adapters

Adapters are random (rank r on all 7 linear modules of every layer, PEFT keeps them in fp32);
the bank comes from ``compress_adapters`` (its compression time is recorded). Throughput is
new tokens (B × new_tokens, prefill included in the time) per second of ``generate()``.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import lolakernels

from .timing import headless_pyplot, interleaved_seconds, machine_description, write_results

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("peft", "accelerate", "bank")


@dataclass(frozen=True)
class Config:
    dtype: str
    adapters: int
    batch: int
    prompt_tokens: int = 8
    new_tokens: int = 8
    adapter_rank: int = 8
    bank_rank: int = 16


def full_grid() -> list[Config]:
    """The issue's grid: N ∈ {1, 8, 64, 256}, fp32 and bf16, one batch of 256 sequences."""
    return [Config(dtype, n, 256) for dtype in ("float32", "bfloat16") for n in (1, 8, 64, 256)]


def quick_grid() -> list[Config]:
    return [Config("float32", n, 8, prompt_tokens=6, new_tokens=4) for n in (1, 8)]


def random_peft_model(base_model, count: int, rank: int, targets=ALL_LINEAR, seed: int = 0, b_scale: float = 0.05):
    """A PeftModel on ``base_model`` (modified in place) with ``count`` random adapters
    ``adapter0 ..`` (rank ``rank``, alpha = 2·rank), built layer by layer (``update_layer``), which is
    far faster than ``add_adapter`` per adapter. Adapter weights are fp32, as PEFT keeps them."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False)
    peft_model = peft.get_peft_model(base_model, config, adapter_name="adapter0")
    layers = [m for m in peft_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    for i in range(1, count):
        name = f"adapter{i}"
        peft_model.peft_config[name] = copy.deepcopy(config)
        for layer in layers:
            layer.update_layer(name, rank, 2 * rank, config=config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for name in layer.lora_A:
                a, b = layer.lora_A[name], layer.lora_B[name]
                a.float()
                b.float()
                a.weight.copy_(torch.randn(a.weight.shape, generator=generator) / a.weight.shape[1] ** 0.5)
                b.weight.copy_(torch.randn(b.weight.shape, generator=generator) * b_scale / rank ** 0.5)
    peft_model.base_model.set_adapter("adapter0")
    return peft_model.eval()


def adapters_of(peft_model, names) -> dict:
    """``{name: (LoraConfig, state dict)}`` for ``compress_adapters``, sharing the weights."""
    import peft

    layers = {path: m for path, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    result = {}
    for name in names:
        config = copy.deepcopy(peft_model.peft_config[name])
        config.base_model_name_or_path = getattr(peft_model.get_base_model().config, "name_or_path", None)
        state = {}
        for path, layer in layers.items():
            state[f"{path}.lora_A.weight"] = layer.lora_A[name].weight.detach()
            state[f"{path}.lora_B.weight"] = layer.lora_B[name].weight.detach()
        result[name] = (config, state)
    return result


def generation_seconds(generate: Callable[[], torch.Tensor], repeats: int = 2) -> float:
    """Best wall time of ``generate()`` over ``repeats`` runs, after one warm-up run."""
    generate()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        generate()
        best = min(best, time.perf_counter() - started)
    return best


def interleaved_generation_seconds(generators: dict[str, Callable[[], torch.Tensor]], rounds: int = 2
                                   ) -> dict[str, float]:
    """Best wall time of each ``generate()`` over ``rounds`` rounds that run every method once in
    turn, after one warm-up run each: a burst of other work on the machine then slows one round
    of every method rather than all the runs of one."""
    for generate in generators.values():
        generate()
    best = {name: float("inf") for name in generators}
    for _ in range(rounds):
        for name, generate in generators.items():
            started = time.perf_counter()
            generate()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def mixed_batch_generators(peft_model, served_model, bank, input_ids: torch.Tensor, names: list[str],
                           new_tokens: int, *, with_one_adapter: bool = False) -> dict[str, Callable[[], torch.Tensor]]:
    """``generate()`` callables for the three methods on one mixed batch (greedy, exactly
    ``new_tokens`` new tokens). ``peft`` and ``accelerate`` share ``peft_model``; each call puts
    the right layer classes in place. ``with_one_adapter`` adds ``bank_one_adapter``: the same
    bank serving the first sequence's adapter to the whole batch."""
    from ..peft import accelerate, restore

    settings = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False)
    ids = [-1 if n == "__base__" else bank.adapter_names.index(n) for n in names]

    def peft_mixed():
        restore(peft_model)
        with torch.no_grad():
            return peft_model.generate(input_ids=input_ids, adapter_names=names, **settings)

    def accelerated():
        accelerate(peft_model)
        with torch.no_grad():
            return peft_model.generate(input_ids=input_ids, adapter_names=names, **settings)

    def bank_served():
        with torch.no_grad():
            return served_model.generate(input_ids, adapter_ids=ids, **settings)

    def bank_one_adapter():
        with torch.no_grad():
            return served_model.generate(input_ids, adapter_ids=[ids[0]] * len(ids), **settings)

    generators = {"peft": peft_mixed, "accelerate": accelerated, "bank": bank_served}
    if with_one_adapter:
        generators["bank_one_adapter"] = bank_one_adapter
    return generators


def _contiguous_lm_head_input(model) -> None:
    """Makes the output head's input contiguous. generate() feeds it the last position's slice
    ``hidden[:, -1:, :]`` (strided); with torch 2.13 on the CPU, a bf16 ``F.linear`` on a strided
    3-D input and a weight that does not require grad (a frozen model, as PEFT leaves it) expands
    the weight over the batch and copies it — 25 s for SmolLM2's 49152 × 576 head at B = 256,
    against 0.05 s on a contiguous input (pytorch/pytorch#151934: the bf16 bmm copies the
    broadcast weight per batch). Applied to every method, so the table compares the adapters,
    not that slow path."""
    head = model.get_output_embeddings()
    head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))


def run_config(cfg: Config, base_model, progress: bool = True) -> dict:
    from ..peft import attach_bank, restore
    from ..peft.bank_serving import detach_bank

    dtype = getattr(torch, cfg.dtype)
    row = asdict(cfg)
    started = time.perf_counter()
    peft_model = random_peft_model(copy.deepcopy(base_model).to(dtype), cfg.adapters, cfg.adapter_rank)
    row["peft_setup_seconds"] = time.perf_counter() - started
    names = [f"adapter{i}" for i in range(cfg.adapters)]
    started = time.perf_counter()
    bank = lolakernels.compress_adapters(adapters_of(peft_model, names), cfg.bank_rank, method="jd-full",
                                         progress=False)
    row["compress_seconds"] = time.perf_counter() - started
    served = attach_bank(copy.deepcopy(base_model).to(dtype).requires_grad_(False), bank)  # frozen, as PEFT's
    _contiguous_lm_head_input(peft_model.get_base_model())
    _contiguous_lm_head_input(served)
    generator = torch.Generator().manual_seed(cfg.adapters)
    input_ids = torch.randint(0, base_model.config.vocab_size, (cfg.batch, cfg.prompt_tokens), generator=generator)
    batch_names = [names[s % cfg.adapters] for s in range(cfg.batch)]
    methods = mixed_batch_generators(peft_model, served, bank, input_ids, batch_names, cfg.new_tokens,
                                     with_one_adapter=True)
    # The bank with N adapters and with one are timed in turn: "bank vs one adapter" is their ratio.
    bank_methods = {name: methods.pop(name) for name in ("bank", "bank_one_adapter")}
    timings = {name: generation_seconds(generate) for name, generate in methods.items()}
    for generate in bank_methods.values():  # warm-up
        generate()
    timings.update(interleaved_seconds(bank_methods, rounds=3, min_runs=1, min_seconds=0.0, warmup=0))
    outputs = {name: generate() for name, generate in methods.items()}  # accelerate must reproduce PEFT's tokens
    for name, seconds in timings.items():
        row[f"{name}_seconds"] = seconds
        row[f"{name}_tokens_per_s"] = cfg.batch * cfg.new_tokens / seconds
        if progress:
            print(f"  {cfg.dtype} N={cfg.adapters} B={cfg.batch}: {name} {row[f'{name}_tokens_per_s']:.1f} tokens/s",
                  flush=True)
    restore(peft_model)
    row["accelerate_same_tokens_as_peft"] = bool(torch.equal(outputs["accelerate"], outputs["peft"]))
    row["accelerate_speedup_vs_peft"] = row["accelerate_tokens_per_s"] / row["peft_tokens_per_s"]
    row["bank_speedup_vs_peft"] = row["bank_tokens_per_s"] / row["peft_tokens_per_s"]
    row["bank_vs_one_adapter"] = row["bank_tokens_per_s"] / row["bank_one_adapter_tokens_per_s"]
    detach_bank(served)
    del peft_model, served
    return row


def markdown_table(rows: list[dict], machine: str) -> str:
    lines = [
        f"# Mixed-batch generation on SmolLM2-135M-Instruct, {machine}",
        "",
        "Greedy generation of B sequences (sequence s uses adapter s mod N), new tokens per second of",
        "`generate()` (prefill included), best of 2 runs after a warm-up. Random rank-r adapters on all 7",
        "linear modules × 30 layers; the bank is JD-Full of the same adapters. `bank vs N=1` is the bank's",
        "throughput relative to the same dtype and batch with a single adapter (N = 1 row); `bank vs one",
        "adapter` relates it to the same bank serving one adapter for the whole batch, timed in turn with it",
        "(best of 3 rounds each), which a slow phase of a shared machine cannot skew. Every method's output head",
        "gets a contiguous input (torch 2.13's bf16 linear on generate()'s strided last-position slice",
        "otherwise copies the head weight per sequence when the model is frozen: 25 s per prefill here).",
        "",
        "| dtype | N | B | r | R | PEFT mixed batch | accelerate | attach_bank | accelerate vs PEFT | bank vs PEFT "
        "| bank vs N=1 | bank vs one adapter | compress s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    single = {(r["dtype"], r["batch"]): r["bank_tokens_per_s"] for r in rows if r["adapters"] == 1}
    for r in rows:
        reference = single.get((r["dtype"], r["batch"]))
        relative = f"{100 * r['bank_tokens_per_s'] / reference:.0f}%" if reference else "–"
        compress = f"{r['compress_seconds']:.1f}" if "compress_seconds" in r else "–"
        one_adapter = f"{100 * r['bank_vs_one_adapter']:.0f}%" if "bank_vs_one_adapter" in r else "–"
        marker = " †" if r.get("transcribed_from_output") else ""
        lines.append(
            f"| {r['dtype']}{marker} | {r['adapters']} | {r['batch']} | {r['adapter_rank']} | {r['bank_rank']} "
            f"| {r['peft_tokens_per_s']:.1f} | {r['accelerate_tokens_per_s']:.1f} | {r['bank_tokens_per_s']:.1f} "
            f"| {r['accelerate_tokens_per_s'] / r['peft_tokens_per_s']:.2f}× "
            f"| {r['bank_tokens_per_s'] / r['peft_tokens_per_s']:.2f}× | {relative} | {one_adapter} | {compress} |")
    if any(r.get("transcribed_from_output") for r in rows):
        lines += ["", "† transcribed from the lines an earlier run printed (it was stopped before writing its files)."]
    return "\n".join(lines) + "\n"


def row_key(row: dict) -> tuple:
    """What identifies a configuration's row when results of several runs are merged."""
    return tuple(row[field] for field in Config.__dataclass_fields__)


def merged_rows(previous: list[dict], new: list[dict]) -> list[dict]:
    """``previous`` with the rows of ``new`` replacing those of the same configuration, sorted by
    dtype (fp32 first), batch and N."""
    by_key = {row_key(r): r for r in previous if all(f in r for f in Config.__dataclass_fields__)}
    by_key.update({row_key(r): r for r in new})
    return sorted(by_key.values(), key=lambda r: (r["dtype"] != "float32", r["dtype"], r["batch"], r["adapters"]))


def plot(rows: list[dict], path: Path) -> Optional[Path]:
    """Tokens/s vs N per method, one panel per dtype."""
    plt = headless_pyplot()
    if plt is None:
        return None
    dtypes = sorted({r["dtype"] for r in rows})
    figure, axes = plt.subplots(1, len(dtypes), figsize=(5.5 * len(dtypes), 4), squeeze=False)
    for axis, dtype in zip(axes[0], dtypes):
        for method, label, color in (("peft", "PEFT mixed batch", "tab:red"), ("accelerate", "accelerate", "tab:green"),
                                     ("bank", "attach_bank (JD-Full)", "tab:blue")):
            points = sorted((r["adapters"], r[f"{method}_tokens_per_s"]) for r in rows if r["dtype"] == dtype)
            axis.plot(*zip(*points), marker="o", color=color, label=label)
        axis.set_xscale("log")
        axis.set_xlabel("adapters N in the batch")
        axis.set_ylabel("new tokens / s")
        axis.set_title(f"SmolLM2-135M, {dtype}")
        axis.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def run(configs: list[Config], out_dir: Optional[Path], *, stem: str = "serving_smollm2_cpu", model=None,
        progress: bool = True) -> tuple[list[dict], str]:
    """Runs every config; returns (rows, markdown). With ``out_dir``, writes <stem>.json/.md/.png
    there after each config, merged with the rows an earlier run left in <stem>.json (a rerun of a
    configuration replaces its row)."""
    from .. import models

    if model is None:
        reason = models.smollm2_missing_reason()
        if reason is not None:
            raise RuntimeError(f"the serving benchmark runs on SmolLM2-135M-Instruct: {reason}")
        model = models.load_smollm2(torch.float32)
    machine = machine_description()
    previous = []
    if out_dir is not None and (out_dir / f"{stem}.json").exists():
        previous = json.loads((out_dir / f"{stem}.json").read_text()).get("rows", [])
    rows = []
    for index, cfg in enumerate(configs):
        if progress:
            print(f"[{index + 1}/{len(configs)}] {cfg}", flush=True)
        rows.append(run_config(cfg, model, progress))
        if out_dir is not None:  # after every configuration, so a run stopped early keeps what it measured
            all_rows = merged_rows(previous, rows)
            payload = {"machine": machine, "torch": torch.__version__, "lolakernels": lolakernels.__version__,
                       "model": getattr(model.config, "name_or_path", None), "rows": all_rows}
            write_results(out_dir, stem, payload, markdown_table(all_rows, machine))
            plot(all_rows, out_dir / f"{stem}.png")
    return rows, markdown_table(merged_rows(previous, rows) if out_dir is not None else rows, machine)
