"""Quality of joint adapter compression on real adapters: what compressing costs in task accuracy.

One LoRA adapter per task of :mod:`.tasks` (trained by :mod:`.train_lora` on SmolLM2-135M-Instruct,
cached) is evaluated on the task's held-out split, uncompressed and after compressing all of them
into an :class:`~lolakernels.AdapterBank` for every (method, R, clusters) of the grid. Per task:

* exact-match accuracy: the answer's tokens, then the end-of-sequence token, must each be the
  model's top choice given the prompt and the answer tokens before it (teacher forcing). In exact
  arithmetic this is greedy decoding producing the answer in its own tokenization, so one
  teacher-forced forward gives both this accuracy and the loss. It can differ from running
  ``generate()``: greedy decoding may spell the same text with other tokens, and cached decoding
  rounds differently in bf16, which flips near-ties. Real batched ``generate()`` therefore runs
  too for the base model and the uncompressed adapters, and the results record its accuracy and
  how often the two criteria agree (94-100% per task in the committed run).
* loss: mean cross-entropy over answer tokens (and the end token), teacher-forced.

A compressed adapter is evaluated through PEFT: its bank factors (``lora_A = lora_a[c]``,
``lora_B = lora_b[c] @ Σ_i``, scaling 1, exactly what ``AdapterBank.export_peft`` writes) are
copied into a PEFT model of rank R, and the run checks on one adapter that this gives the same
logits as ``export_peft`` → ``PeftModel.from_pretrained``.

Storage ratio = numbers the bank stores (per slot: ``C·R·(d_in + d_out)`` for the bases, plus
``N·R`` diagonal or ``N·R²`` full cores) / numbers of the N uncompressed adapters
(``Σ_slots r·(d_in + d_out)`` each).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from .tasks import TASKS, Task
from .train_lora import IGNORE_INDEX, answer_logits, collate, tokenize_examples

EVAL_EXAMPLES = 64
EVAL_SEED = 1
RANKS = (8, 16, 32, 64)
METHODS = ("jd-diag", "jd-full")
CLUSTERS = (1, 2, 4)
TARGET_RELATIVE_ACCURACY = 0.95
# Per-task ratios of accuracies are only meaningful where the uncompressed adapter solves a fair
# share of its task; below this, one example more or less swings the ratio wildly.
MIN_ACCURACY_FOR_TASK_RATIO = 0.2


@dataclass(frozen=True)
class CompressionConfig:
    method: str
    rank: int
    clusters: int

    @property
    def label(self) -> str:
        return f"{self.method} R={self.rank} C={self.clusters}"


def full_grid() -> list[CompressionConfig]:
    """R ∈ {8, 16, 32, 64} × {jd-diag, jd-full} × clusters ∈ {1, 2, 4}: 24 configurations, one
    cluster count at a time (so an interrupted run has covered every R and method for C = 1 first)."""
    return [CompressionConfig(method, rank, clusters) for clusters in CLUSTERS for rank in RANKS for method in METHODS]


# --------------------------------------------------------------------------- evaluation

@dataclass
class TaskEvaluation:
    """Held-out results of one model on one task."""

    accuracy: float          # exact match, teacher-forced criterion (≡ greedy decoding)
    loss: float              # mean answer-token cross-entropy
    generated_accuracy: Optional[float] = None   # exact match of real generate() output, when run
    criteria_agreement: Optional[float] = None   # fraction of examples where both criteria agree
    samples: Optional[list[tuple[str, str]]] = None  # a few (answer, generated) pairs


def evaluation_set(task: Task, tokenizer, count: int = EVAL_EXAMPLES, seed: int = EVAL_SEED):
    """(examples, token pairs) of the task's held-out split, sorted by length to limit padding."""
    examples = task.examples(count, seed=seed, split="eval")
    pairs = tokenize_examples(tokenizer, examples)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    return [examples[i] for i in order], [pairs[i] for i in order]


@torch.no_grad()
def teacher_forced(causal_lm, tokenizer, pairs, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: whether every answer position's top token is the target (``[n]`` bool) and
    the mean answer-token cross-entropy (``[n]`` float)."""
    correct, losses = [], []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        input_ids, attention_mask, labels = collate(batch, pad_id)
        logits, targets = answer_logits(causal_lm, input_ids, attention_mask, labels)
        token_loss = F.cross_entropy(logits, targets, reduction="none")
        token_right = logits.argmax(-1) == targets
        # Answer tokens are contiguous per row, in row order: split them back per example.
        lengths = (labels != IGNORE_INDEX).sum(1).tolist()
        for right, loss in zip(token_right.split(lengths), token_loss.split(lengths)):
            correct.append(bool(right.all()))
            losses.append(loss.mean().item())
    return torch.tensor(correct), torch.tensor(losses)


@torch.no_grad()
def greedy_generate(causal_lm, tokenizer, pairs, max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy continuations of the prompts (left padding, stops at end-of-sequence), decoded."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for start in range(0, len(pairs), batch_size):
        prompts = [(prompt_ids, []) for prompt_ids, _ in pairs[start:start + batch_size]]
        input_ids, attention_mask, _ = collate(prompts, pad_id, padding_side="left")
        output = causal_lm.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                    max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                    eos_token_id=tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)
    return texts


def evaluate_task(causal_lm, tokenizer, task: Task, *, count: int = EVAL_EXAMPLES, generate: bool = False
                  ) -> TaskEvaluation:
    """Accuracy and loss of ``causal_lm`` (adapter active, if any) on ``count`` held-out examples."""
    examples, pairs = evaluation_set(task, tokenizer, count)
    correct, losses = teacher_forced(causal_lm, tokenizer, pairs)
    result = TaskEvaluation(accuracy=correct.float().mean().item(), loss=losses.mean().item())
    if generate:
        longest_answer = max(len(answer_ids) for _, answer_ids in pairs)
        texts = greedy_generate(causal_lm, tokenizer, pairs, max_new_tokens=longest_answer + 2)
        generated_right = torch.tensor([task.is_correct(answer, text) for (_, answer), text in zip(examples, texts)])
        result.generated_accuracy = generated_right.float().mean().item()
        result.criteria_agreement = (generated_right == correct).float().mean().item()
        result.samples = [(answer, text) for (_, answer), text in list(zip(examples, texts))[:3]]
    return result


# --------------------------------------------------------------------------- adapters in a PEFT model

class LoraSlots:
    """A PEFT model of rank R over ``model`` whose single adapter's weights are set from factors.

    ``set_factors({slot: (lora_a [R', d_in], lora_b [d_out, R'])})`` with R' ≤ R (zero-padded) and
    scaling 1: the delta of each slot is ``lora_b @ lora_a``. ``close()`` returns the base model.
    """

    def __init__(self, model, slots: Sequence[str], rank: int):
        import peft

        self.rank = rank
        config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=list(slots), lora_dropout=0.0,
                                 bias="none", task_type="CAUSAL_LM")
        self.peft_model = peft.get_peft_model(model, config).eval()
        self.causal_lm = self.peft_model.get_base_model()
        self._layers = {slot: self.causal_lm.get_submodule(slot) for slot in slots}

    @torch.no_grad()
    def set_factors(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for slot, layer in self._layers.items():
            lora_a, lora_b = factors[slot]
            rank = lora_a.shape[0]
            weight_a, weight_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            weight_a.zero_()
            weight_b.zero_()
            weight_a[:rank].copy_(lora_a)
            weight_b[:, :rank].copy_(lora_b)

    def close(self):
        return self.peft_model.unload()


def peft_adapter_factors(directory: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """Factors ``{slot: (A [r, d_in], s·B [d_out, r])}`` of a PEFT adapter directory, PEFT's scaling
    folded into B, and its rank r."""
    from ..compress.adapters import read_adapter

    adapter = read_adapter(Path(directory).name, str(directory))
    factors, rank = {}, 0
    for slot in adapter.slots:
        left, right = adapter.factors(slot)
        factors[slot] = (right, left)
        rank = max(rank, right.shape[0])
    return factors, rank


def bank_factors(bank, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{slot: (lora_a[c] [R, d_in], lora_b[c] @ Σ_i [d_out, R])}``: what ``export_peft`` writes."""
    factors = {}
    for slot in bank.slots:
        weights = bank.slot_weights(slot)
        cluster = int(weights.basis_of[bank.adapter_names.index(name)])
        factors[slot] = (weights.lora_a[cluster], weights.lora_b[cluster] @ bank.core(name, slot))
    return factors


def storage_numbers(bank) -> int:
    """Floats the bank stores: bases ``C·R·(d_in + d_out)`` and cores ``N·R`` or ``N·R²`` per slot."""
    total = 0
    for slot in bank.slots:
        weights = bank.slot_weights(slot)
        total += weights.lora_a.numel() + weights.lora_b.numel() + weights.sigma.numel()
    return total


def adapters_numbers(factors_by_adapter: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> int:
    return sum(a.numel() + b.numel() for factors in factors_by_adapter.values() for a, b in factors.values())


# --------------------------------------------------------------------------- the study

def _evaluate_all(causal_lm, tokenizer, task_names: Sequence[str], count: int, generate: bool,
                  before_task: Optional[Callable[[str], None]] = None) -> dict[str, dict]:
    results = {}
    for name in task_names:
        if before_task is not None:
            before_task(name)
        results[name] = dataclasses.asdict(evaluate_task(causal_lm, tokenizer, TASKS[name], count=count,
                                                         generate=generate))
    return results


def evaluate_base(model, tokenizer, task_names: Sequence[str], count: int = EVAL_EXAMPLES) -> dict:
    """The base model without any adapter (real generation and the teacher-forced criterion)."""
    started = time.perf_counter()
    tasks = _evaluate_all(model, tokenizer, task_names, count, generate=True)
    return {"label": "base model", "tasks": tasks, "seconds": time.perf_counter() - started}


def evaluate_uncompressed(model, tokenizer, adapter_dirs: dict[str, Path], count: int = EVAL_EXAMPLES) -> dict:
    """Each task with its own uncompressed adapter (real generation and the teacher-forced criterion)."""
    started = time.perf_counter()
    factors = {name: peft_adapter_factors(directory)[0] for name, directory in adapter_dirs.items()}
    rank = max(a.shape[0] for per_slot in factors.values() for a, _ in per_slot.values())
    slots = list(next(iter(factors.values())))
    lora = LoraSlots(model, slots, rank)
    try:
        tasks = _evaluate_all(lora.causal_lm, tokenizer, list(adapter_dirs), count, generate=True,
                              before_task=lambda name: lora.set_factors(factors[name]))
    finally:
        lora.close()
    return {"label": "uncompressed", "rank": rank, "tasks": tasks, "stored_numbers": adapters_numbers(factors),
            "seconds": time.perf_counter() - started}


def evaluate_compressed(model, tokenizer, adapter_dirs: dict[str, Path], config: CompressionConfig,
                        count: int = EVAL_EXAMPLES) -> dict:
    """Compresses all adapters with ``config``, then evaluates every task with its compressed adapter."""
    import lolakernels

    started = time.perf_counter()
    bank = lolakernels.compress_adapters([str(directory) for directory in adapter_dirs.values()], config.rank,
                                         method=config.method, clusters=config.clusters, progress=False)
    compress_seconds = time.perf_counter() - started
    errors = bank.reconstruction_error()
    lora = LoraSlots(model, bank.slots, bank.rank)
    try:
        tasks = _evaluate_all(lora.causal_lm, tokenizer, list(adapter_dirs), count, generate=False,
                              before_task=lambda name: lora.set_factors(bank_factors(bank, name)))
    finally:
        lora.close()
    return {"label": config.label, **dataclasses.asdict(config), "tasks": tasks,
            "stored_numbers": storage_numbers(bank),
            "reconstruction_error_mean": errors.mean(), "reconstruction_error_by_adapter": errors.by_adapter(),
            "reconstruction_error_by_module": errors.by_module(),
            "compress_seconds": compress_seconds, "seconds": time.perf_counter() - started}


@torch.no_grad()
def check_against_export(model, tokenizer, adapter_dirs: dict[str, Path], config: CompressionConfig,
                         work_dir: Path) -> dict:
    """Max |logit difference| between copying bank factors into a PEFT model (what this benchmark
    does) and ``bank.export_peft`` → ``PeftModel.from_pretrained``, and likewise between folding an
    uncompressed adapter's scaling into its factors and loading it with PEFT; on one adapter's
    held-out batch. Both should be rounding-level. The bank here is only a test object: fitted
    with a few sweeps (``max_iters=3``) since the check does not depend on how good it is."""
    import copy

    import peft

    import lolakernels

    name, directory = next(iter(adapter_dirs.items()))
    _, pairs = evaluation_set(TASKS[name], tokenizer, 16)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask, labels = collate(pairs, pad_id)

    def logits_of(causal_lm):
        return answer_logits(causal_lm, input_ids, attention_mask, labels)[0]

    def via_peft(adapter_dir: Path) -> torch.Tensor:
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir)).eval()
        return logits_of(loaded.get_base_model())

    def via_slots(factors, rank) -> torch.Tensor:
        lora = LoraSlots(copy.deepcopy(model), list(factors), rank)
        lora.set_factors(factors)
        return logits_of(lora.causal_lm)

    factors, rank = peft_adapter_factors(directory)
    uncompressed = (via_slots(factors, rank) - via_peft(directory)).abs().max().item()
    bank = lolakernels.compress_adapters([str(d) for d in adapter_dirs.values()], config.rank, method=config.method,
                                         clusters=config.clusters, max_iters=3, progress=False)
    exported = bank.export_peft(name, work_dir / f"export-{name}")
    compressed = (via_slots(bank_factors(bank, name), bank.rank) - via_peft(exported)).abs().max().item()
    reference = via_peft(directory).abs().max().item()
    return {"adapter": name, "config": config.label, "max_abs_logit_difference_uncompressed": uncompressed,
            "max_abs_logit_difference_compressed": compressed, "max_abs_logit": reference}


def summarize(base: dict, uncompressed: dict, rows: list[dict]) -> list[dict]:
    """Per configuration: accuracy kept (Σ compressed accuracy / Σ uncompressed), mean loss ratio and
    increase, the worst task's kept accuracy (among tasks whose uncompressed accuracy is at least
    MIN_ACCURACY_FOR_TASK_RATIO), and the storage ratio."""
    names = list(uncompressed["tasks"])
    reference_accuracy = sum(uncompressed["tasks"][n]["accuracy"] for n in names)
    summary = []
    for row in rows:
        tasks = row["tasks"]
        per_task_kept = {n: tasks[n]["accuracy"] / uncompressed["tasks"][n]["accuracy"]
                         for n in names if uncompressed["tasks"][n]["accuracy"] >= MIN_ACCURACY_FOR_TASK_RATIO}
        worst = min(per_task_kept, key=per_task_kept.get) if per_task_kept else None
        loss_ratio = [tasks[n]["loss"] / uncompressed["tasks"][n]["loss"] for n in names]
        loss_increase = [tasks[n]["loss"] - uncompressed["tasks"][n]["loss"] for n in names]
        summary.append({
            "label": row["label"], "method": row["method"], "rank": row["rank"], "clusters": row["clusters"],
            "storage_ratio": row["stored_numbers"] / uncompressed["stored_numbers"],
            "reconstruction_error_mean": row["reconstruction_error_mean"],
            "accuracy_mean": sum(tasks[n]["accuracy"] for n in names) / len(names),
            "accuracy_kept": (sum(tasks[n]["accuracy"] for n in names) / reference_accuracy
                              if reference_accuracy > 0 else math.nan),
            "loss_ratio_mean": sum(loss_ratio) / len(loss_ratio),
            "loss_increase_mean": sum(loss_increase) / len(loss_increase),
            "worst_task": worst, "worst_task_accuracy_kept": per_task_kept.get(worst, math.nan),
            "accuracy_kept_by_task": per_task_kept,
        })
    return summary


def verdict(summary: list[dict], target: float = TARGET_RELATIVE_ACCURACY) -> Optional[dict]:
    """The configuration with the smallest storage ratio that keeps ≥ target of the accuracy."""
    passing = [s for s in summary if s["accuracy_kept"] >= target]
    return min(passing, key=lambda s: s["storage_ratio"]) if passing else None


def _pct(value: Optional[float], digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}%"


def markdown_report(payload: dict) -> str:
    base, uncompressed, summary = payload["base"], payload["uncompressed"], payload["summary"]
    names = list(uncompressed["tasks"])
    best = payload["verdict"]
    target = payload["target_accuracy_kept"]
    settings = payload["settings"]
    if best is not None:
        headline = (f"**Target met: {best['label']} keeps {_pct(best['accuracy_kept'])} of the uncompressed adapters' "
                    f"accuracy at a storage ratio of {best['storage_ratio']:.3f} "
                    f"({1 / best['storage_ratio']:.1f}× smaller than the {len(names)} adapters)**; it is the smallest "
                    f"configuration of the grid keeping ≥ {_pct(target, 0)} (worst task: {best['worst_task']}, "
                    f"{_pct(best['worst_task_accuracy_kept'])} kept).")
    else:
        headline = f"**Target not met: no configuration of the grid keeps ≥ {_pct(target, 0)} of the accuracy.**"
    if payload.get("missing_configurations"):
        headline += (f" Partial report: {len(payload['missing_configurations'])} configurations not evaluated yet "
                     f"({', '.join(payload['missing_configurations'])}); the verdict covers the others only.")
    lines = [
        f"# Joint compression quality on {len(names)} real LoRA adapters ({payload['model']})",
        "",
        headline,
        "",
        f"Machine: {payload['machine']} per process, {payload.get('cpu_count', '?')} cores shared with other "
        f"work. Adapters: r = {settings['rank']}, alpha = {settings['alpha']}, "
        f"{'/'.join(settings['target_modules'])} on all layers ({settings['slots']} slots), "
        f"{settings['steps']} steps × batch {settings['batch_size']}, AdamW lr {settings['lr']}, base model in "
        f"{settings['base_dtype']} (LoRA weights fp32); one adapter per task, inputs from the Python documentation "
        f"(`lolakernels.corpus`). Evaluation: {settings['eval_examples']} held-out examples per task, base model in "
        f"{settings['base_dtype']}; accuracy = exact match by the teacher-forced criterion (every answer token and "
        f"the end token are the model's top choice given the ones before: greedy decoding of the answer's own "
        f"tokenization; its agreement with real `generate()` is in the per-task table), loss = mean answer-token "
        f"cross-entropy.",
        "",
        "Accuracy kept = Σ_tasks compressed accuracy / Σ_tasks uncompressed accuracy. Storage ratio = numbers the "
        "bank stores (bases + Σ's, all slots) / numbers of the uncompressed adapters. Reconstruction error = mean "
        "squared relative Frobenius error over adapters × slots. Loss ratio = mean over tasks of compressed / "
        "uncompressed loss; Δloss = mean increase in nats. Worst task: lowest compressed / uncompressed accuracy "
        f"among tasks whose uncompressed adapter reaches ≥ {_pct(MIN_ACCURACY_FOR_TASK_RATIO, 0)}.",
        "",
        "| method | R | clusters | storage ratio | reconstruction error | accuracy | accuracy kept | loss ratio "
        "| Δloss | worst task (kept) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    mean_uncompressed = sum(uncompressed["tasks"][n]["accuracy"] for n in names) / len(names)
    mean_base = sum(base["tasks"][n]["accuracy"] for n in names) / len(names)
    lines.append(f"| uncompressed | {uncompressed['rank']} | – | 1.000 | 0 | {_pct(mean_uncompressed)} | 100% | 1.00 | 0 | – |")
    lines.append(f"| base model, no adapter | – | – | – | – | {_pct(mean_base)} | "
                 f"{_pct(mean_base / mean_uncompressed if mean_uncompressed else math.nan)} | – | – | – |")
    for s in sorted(summary, key=lambda s: (s["method"], s["clusters"], s["rank"])):
        mark = " **←**" if best is not None and s["label"] == best["label"] else ""
        lines.append(
            f"| {s['method']} | {s['rank']} | {s['clusters']} | {s['storage_ratio']:.3f} "
            f"| {s['reconstruction_error_mean']:.3f} | {_pct(s['accuracy_mean'])} | {_pct(s['accuracy_kept'])}{mark} "
            f"| {s['loss_ratio_mean']:.2f} | {s['loss_increase_mean']:+.3f} | {s['worst_task']} "
            f"({_pct(s['worst_task_accuracy_kept'], 0)}) |")
    lines += ["", "## Per task: base model and uncompressed adapters", "",
              "Accuracy by the teacher-forced criterion; 'generated' is the exact match of real batched greedy "
              "`generate()` output (left padding), and 'agree' the fraction of examples where the two criteria agree.",
              "",
              "| task | base accuracy | base generated | adapter accuracy | adapter generated | agree | adapter loss "
              "| train s/step | sample (answer → generated) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        b, u = base["tasks"][n], uncompressed["tasks"][n]
        sample = u["samples"][0] if u.get("samples") else ("", "")
        step = payload["training"].get(n, {}).get("seconds_per_step")
        lines.append(f"| {n} | {_pct(b['accuracy'], 0)} | {_pct(b['generated_accuracy'], 0)} | {_pct(u['accuracy'], 0)} "
                     f"| {_pct(u['generated_accuracy'], 0)} | {_pct(u['criteria_agreement'], 0)} | {u['loss']:.3f} "
                     f"| {'–' if step is None else f'{step:.1f}'} | `{sample[0]}` → `{sample[1]}` |")
    lines += ["", "## Per task: accuracy of each compressed configuration", "",
              "| config | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines.append("| uncompressed | " + " | ".join(_pct(uncompressed["tasks"][n]["accuracy"], 0) for n in names) + " |")
    rows_by_label = {row["label"]: row for row in payload["rows"]}
    for s in sorted(summary, key=lambda s: (s["method"], s["clusters"], s["rank"])):
        tasks = rows_by_label[s["label"]]["tasks"]
        lines.append(f"| {s['label']} | " + " | ".join(_pct(tasks[n]["accuracy"], 0) for n in names) + " |")
    lines += ["", "## Per task: loss of each compressed configuration", "",
              "| config | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines.append("| uncompressed | " + " | ".join(f"{uncompressed['tasks'][n]['loss']:.3f}" for n in names) + " |")
    for s in sorted(summary, key=lambda s: (s["method"], s["clusters"], s["rank"])):
        tasks = rows_by_label[s["label"]]["tasks"]
        lines.append(f"| {s['label']} | " + " | ".join(f"{tasks[n]['loss']:.3f}" for n in names) + " |")
    check = payload.get("export_check")
    if check:
        lines += ["", f"Check: writing bank factors into a PEFT model vs `export_peft` → `PeftModel.from_pretrained` "
                      f"({check['config']}, adapter {check['adapter']}): max |Δlogit| "
                      f"{check['max_abs_logit_difference_compressed']:.2e}; folded vs PEFT-loaded uncompressed adapter: "
                      f"{check['max_abs_logit_difference_uncompressed']:.2e} (max |logit| {check['max_abs_logit']:.1f})."]
    timing = payload.get("timing", {})
    if timing:
        lines += ["", "Time on this machine: " + "; ".join(f"{k} {v}" for k, v in timing.items()) + "."]
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> Optional[Path]:
    """Accuracy kept and reconstruction error vs storage ratio, one line per (method, clusters)."""
    from .timing import headless_pyplot

    plt = headless_pyplot()
    if plt is None:
        return None
    summary = payload["summary"]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {1: "tab:blue", 2: "tab:orange", 4: "tab:green"}
    styles = {"jd-diag": ("o", "--"), "jd-full": ("s", "-")}
    for method, (marker, line) in styles.items():
        for clusters, color in colors.items():
            points = sorted((s["storage_ratio"], s["accuracy_kept"], s["reconstruction_error_mean"], s["rank"])
                            for s in summary if s["method"] == method and s["clusters"] == clusters
                            and math.isfinite(s["accuracy_kept"]))
            if not points:
                continue
            ratio, kept, error, ranks = zip(*points)
            label = f"{method}, C={clusters}"
            axes[0].plot(ratio, [100 * k for k in kept], line, marker=marker, color=color, label=label)
            axes[1].plot(ratio, error, line, marker=marker, color=color, label=label)
            for x, y, rank in zip(ratio, kept, ranks):
                axes[0].annotate(f"R{rank}", (x, 100 * y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    axes[0].axhline(100 * payload["target_accuracy_kept"], color="gray", linestyle=":", label="target")
    axes[0].set_ylabel("accuracy kept (% of uncompressed)")
    axes[1].set_ylabel("mean squared relative reconstruction error")
    for axis in axes:
        axis.set_xscale("log")
        axis.set_xlabel("storage ratio (bank / uncompressed adapters)")
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"{len(payload['uncompressed']['tasks'])} LoRA adapters on {payload['model']}: "
                    f"joint compression quality ({payload['machine']})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# --------------------------------------------------------------------------- orchestration

def rows_dir(train_config, eval_count: int, model_name: str) -> Path:
    """Where finished evaluations are kept, one JSON per row, so an interrupted or sharded run resumes."""
    from ..models import cache_dir

    return cache_dir() / "quality" / f"{train_config.key(model_name)}-e{eval_count}"


def _row_path(directory: Path, label: str) -> Path:
    return directory / (label.replace(" ", "_").replace("=", "") + ".json")


def _cached_row(directory: Path, label: str, compute: Callable[[], dict], progress: bool) -> dict:
    import json
    import os

    path = _row_path(directory, label)
    if path.is_file():
        return json.loads(path.read_text())
    if progress:
        print(f"evaluating {label} ...", flush=True)
    row = compute()
    directory.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".tmp{os.getpid()}")
    staging.write_text(json.dumps(row, indent=1) + "\n")
    staging.rename(path)
    if progress:
        print(f"  {label}: {row['seconds']:.0f} s", flush=True)
    return row


def run(configs: Iterable[CompressionConfig] = tuple(full_grid()), out_dir: Optional[Path] = None, *,
        train_config=None, task_names: Sequence[str] = tuple(TASKS), eval_count: int = EVAL_EXAMPLES,
        shard: tuple[int, int] = (0, 1), stem: str = "compress_quality", progress: bool = True,
        report_only: bool = False) -> Optional[dict]:
    """The whole study: trains (or loads cached) adapters, evaluates the base model, the uncompressed
    adapters and every compressed configuration, and writes ``<stem>.json/.md/.png`` to ``out_dir``.

    Each finished evaluation is cached under :func:`rows_dir`; ``shard=(i, n)`` evaluates every
    n-th configuration starting at i (run n processes side by side), and whichever process finds
    all rows present writes the report. Returns the payload, or None while rows are missing.
    ``report_only=True`` evaluates nothing: it writes the report from the rows cached so far
    (naming the configurations still missing), provided the base and uncompressed rows exist.
    """
    import json
    import os
    import tempfile

    from ..models import load_smollm2, load_smollm2_tokenizer
    from .timing import machine_description, write_results
    from .train_lora import TrainConfig, cached_adapter_dirs, read_training_log

    train_config = train_config or TrainConfig()
    configs = list(configs)
    index, count = shard
    tokenizer = load_smollm2_tokenizer()
    model = load_smollm2(getattr(torch, train_config.base_dtype))
    model_name = model.config.name_or_path
    adapter_dirs = cached_adapter_dirs(task_names, train_config, model=model, tokenizer=tokenizer, progress=progress)
    directory = rows_dir(train_config, eval_count, model_name)
    names = list(task_names)

    if index == 0 and not report_only:
        _cached_row(directory, "base model", lambda: evaluate_base(model, tokenizer, names, eval_count), progress)
        _cached_row(directory, "uncompressed",
                    lambda: evaluate_uncompressed(model, tokenizer, adapter_dirs, eval_count), progress)
        with tempfile.TemporaryDirectory() as work:
            # jd-full with clusters: exercises full Σ's and several bases.
            check_config = CompressionConfig("jd-full", min(config.rank for config in configs), 2)
            _cached_row(directory, "export check",
                        lambda: {**check_against_export(model, tokenizer, adapter_dirs, check_config, Path(work)),
                                 "seconds": 0.0}, progress)
    for config in ([] if report_only else configs[index::count]):
        _cached_row(directory, config.label,
                    lambda config=config: evaluate_compressed(model, tokenizer, adapter_dirs, config, eval_count),
                    progress)
    labels = ["base model", "uncompressed", "export check"] + [config.label for config in configs]
    missing = [label for label in labels if not _row_path(directory, label).is_file()]
    if missing and not (report_only and not set(missing) & set(labels[:3]) and len(missing) < len(labels) - 3):
        if progress:
            print(f"rows missing: {len(missing)} ({', '.join(missing[:4])} ...)", flush=True)
        return None
    loaded = {label: json.loads(_row_path(directory, label).read_text()) for label in labels if label not in missing}
    rows = [loaded[config.label] for config in configs if config.label not in missing]
    base, uncompressed = loaded["base model"], loaded["uncompressed"]
    summary = summarize(base, uncompressed, rows)
    training = {}
    for name, adapter_dir in adapter_dirs.items():
        log = read_training_log(adapter_dir) or {}
        training[name] = {k: log.get(k) for k in ("seconds", "seconds_per_step", "final_loss", "threads")}
    seconds_per_step = [t["seconds_per_step"] for t in training.values() if t["seconds_per_step"]]
    eval_seconds = [row["seconds"] for row in rows]
    payload = {
        "model": model_name, "machine": machine_description(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "settings": {**dataclasses.asdict(train_config),
                     "slots": len(peft_adapter_factors(next(iter(adapter_dirs.values())))[0]),
                     "eval_examples": eval_count, "eval_seed": EVAL_SEED, "tasks": names},
        "target_accuracy_kept": TARGET_RELATIVE_ACCURACY, "verdict": verdict(summary), "summary": summary,
        "missing_configurations": missing,
        "base": base, "uncompressed": uncompressed, "rows": rows, "export_check": loaded["export check"],
        "training": training,
        "timing": {
            "training": f"{min(seconds_per_step):.1f}–{max(seconds_per_step):.1f} s/step "
                        f"({sum(t['seconds'] for t in training.values()) / 60:.0f} min summed over {len(training)} "
                        f"adapters)",
            "compress + evaluate one configuration": f"{min(eval_seconds):.0f}–{max(eval_seconds):.0f} s",
            "compression alone": f"{min(r['compress_seconds'] for r in rows):.1f}–"
                                 f"{max(r['compress_seconds'] for r in rows):.1f} s",
            "base + uncompressed evaluation (with generation)": f"{base['seconds'] + uncompressed['seconds']:.0f} s",
        },
    }
    markdown = markdown_report(payload)
    if out_dir is not None:
        write_results(Path(out_dir), stem, payload, markdown)
        plot(payload, Path(out_dir) / f"{stem}.png")
    if progress:
        print(markdown.split("\n\n")[1], flush=True)
    return payload
