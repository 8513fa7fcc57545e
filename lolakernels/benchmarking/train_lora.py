"""Brief PEFT LoRA training on one task, and an on-disk cache of the trained adapters.

    from lolakernels.benchmarking import train_lora
    from lolakernels.benchmarking.tasks import TASKS

    peft_model = train_lora.train_adapter(model, tokenizer, TASKS["uppercase"], train_lora.TrainConfig(steps=50))
    peft_model.save_pretrained("out/uppercase")      # a standard PEFT adapter directory
    model = peft_model.unload()                      # the base model again, unchanged

    dirs = train_lora.cached_adapter_dirs(["uppercase", "rot13"])   # trains only what is missing
    # {"uppercase": ~/.cache/lolakernels/adapters/<config key>/uppercase, ...}

Training uses the prompt/answer format of :mod:`.tasks`: the prompt tokens, then the answer
tokens and the end-of-sequence token; only the answer and end tokens carry loss, so the adapter
learns the task and the base model keeps reading the prompt. Every adapter directory also holds
``training.json`` (config, task fingerprint, loss curve, seconds), which is how the cache knows
an adapter is complete and still matches its task.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..models import cache_dir
from .tasks import TASKS, Task

IGNORE_INDEX = -100
METADATA_FILE = "training.json"


@dataclass(frozen=True)
class TrainConfig:
    """LoRA hyper-parameters and the optimisation schedule (AdamW, linear warm-up then linear decay).

    ``base_dtype`` is the dtype the base model is loaded in when :func:`cached_adapter_dirs`
    loads it: bfloat16 runs ~2.7× faster than float32 on AVX512-BF16 CPUs; the LoRA weights stay
    float32 either way (PEFT's default), so only the frozen base is rounded.
    """

    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    steps: int = 80
    batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    seed: int = 0
    base_dtype: str = "bfloat16"

    def key(self, model_name: str) -> str:
        """Names the cache folder: changes with any field or with the base model."""
        text = json.dumps({"model": model_name, **dataclasses.asdict(self)}, sort_keys=True)
        return f"r{self.rank}-s{self.steps}-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def tokenize_examples(tokenizer, examples: Sequence[tuple[str, str]], *, with_answers: bool = True
                      ) -> list[tuple[list[int], list[int]]]:
    """(prompt token ids, answer token ids + end-of-sequence id) per example.

    Prompt and answer are tokenized separately, so training sees exactly the token boundary that
    generation does (the model continues after the prompt's last token). With
    ``with_answers=False`` the answer lists are empty.
    """
    pairs = []
    for prompt, answer in examples:
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        answer_ids = (tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
                      if with_answers else [])
        pairs.append((prompt_ids, answer_ids))
    return pairs


def collate(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, *, padding_side: str = "right"
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pads prompt+answer sequences into a batch.

    Returns ``input_ids [B, L]``, ``attention_mask [B, L]`` and ``labels [B, L]`` where
    ``labels[b, t]`` is the token that position ``t`` must predict (``input_ids[b, t + 1]``) on
    answer targets and ``IGNORE_INDEX`` elsewhere, i.e. already shifted.
    """
    length = max(len(p) + len(a) for p, a in pairs)
    input_ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), length), dtype=torch.long)
    labels = torch.full((len(pairs), length), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt_ids, answer_ids) in enumerate(pairs):
        sequence = prompt_ids + answer_ids
        start = 0 if padding_side == "right" else length - len(sequence)
        input_ids[row, start:start + len(sequence)] = torch.tensor(sequence)
        attention_mask[row, start:start + len(sequence)] = 1
        if answer_ids:
            # Position of the last prompt token predicts the first answer token, and so on.
            first = start + len(prompt_ids) - 1
            labels[row, first:first + len(answer_ids)] = torch.tensor(answer_ids)
    return input_ids, attention_mask, labels


def answer_logits(causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits only where ``labels`` has a target: ``(logits [K, vocab], targets [K])``.

    Runs the decoder, then the output head on the K answer positions alone; the head is about a
    fifth of SmolLM2's compute per token, and prompt positions need none of it.
    """
    hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    keep = labels != IGNORE_INDEX
    return causal_lm.get_output_embeddings()(hidden[keep]).float(), labels[keep]


def train_adapter(model, tokenizer, task: Task, config: TrainConfig = TrainConfig(), *,
                  progress: bool = True, log_every: int = 10):
    """Wraps ``model`` in a fresh PEFT LoRA adapter (named "default") and trains it on ``task``.

    ``model`` is a transformers causal LM; PEFT injects the LoRA layers in place, so call
    ``.unload()`` on the result to get the unchanged base model back. Training uses
    ``config.steps × config.batch_size`` examples of the task's training split, no dropout, and
    fp32. Returns the PeftModel in eval mode; ``peft_model.training_log`` holds
    ``{"loss": [...], "step_seconds": [...], "seconds": total}`` (per-step lists).
    """
    import peft

    torch.manual_seed(config.seed)  # LoRA A's initialisation
    lora_config = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules),
                                  lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(model, lora_config)
    peft_model.train()
    parameters = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    examples = task.examples(config.steps * config.batch_size, seed=config.seed, split="train")
    pairs = tokenize_examples(tokenizer, examples)
    causal_lm = peft_model.get_base_model()
    losses, step_seconds = [], []
    started = time.perf_counter()
    for step in range(config.steps):
        step_started = time.perf_counter()
        batch = pairs[step * config.batch_size:(step + 1) * config.batch_size]
        input_ids, attention_mask, labels = collate(batch, tokenizer.pad_token_id or tokenizer.eos_token_id)
        logits, targets = answer_logits(causal_lm, input_ids, attention_mask, labels)
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_seconds.append(time.perf_counter() - step_started)
        if progress and ((step + 1) % log_every == 0 or step + 1 == config.steps):
            recent = losses[-log_every:]
            print(f"  {task.name}: step {step + 1}/{config.steps}, loss {sum(recent) / len(recent):.3f}, "
                  f"{(time.perf_counter() - started) / (step + 1):.2f} s/step", flush=True)
    peft_model.eval()
    peft_model.training_log = {"loss": losses, "step_seconds": step_seconds,
                               "seconds": time.perf_counter() - started}
    return peft_model


def adapters_root(config: TrainConfig, model_name: str) -> Path:
    """``cache_dir()/adapters/<config key>``: one folder per task below it."""
    return cache_dir() / "adapters" / config.key(model_name)


def _is_complete(directory: Path, task: Task) -> bool:
    try:
        metadata = json.loads((directory / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return metadata.get("task_fingerprint") == task.fingerprint() and (directory / "adapter_config.json").is_file()


def read_training_log(directory: Path) -> Optional[dict]:
    """The ``training.json`` of an adapter directory written by :func:`cached_adapter_dirs`, or None."""
    try:
        return json.loads((Path(directory) / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None


def cached_adapter_dirs(task_names: Iterable[str] = tuple(TASKS), config: TrainConfig = TrainConfig(), *,
                        model=None, tokenizer=None, progress: bool = True) -> dict[str, Path]:
    """PEFT adapter directories for ``task_names``, training (and caching) those not on disk yet.

    The base model is SmolLM2-135M-Instruct in ``config.base_dtype`` unless ``model``/``tokenizer``
    are given (then their ``config.name_or_path`` keys the cache; pass a model in that dtype).
    Adapters already cached for this config and task version are reused as they are. A directory
    appears only once complete (written next to it, then renamed), so an interrupted run never
    leaves half an adapter behind; two processes asking for the same missing adapter at the same
    time both train it (the last one written wins).
    Returns ``{task name: directory}`` in the order asked.
    """
    names = list(task_names)
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise KeyError(f"unknown tasks {unknown}; known: {list(TASKS)}")
    if model is None:
        from ..models import load_smollm2

        model = load_smollm2(getattr(torch, config.base_dtype))
    if tokenizer is None:
        from ..models import load_smollm2_tokenizer

        tokenizer = load_smollm2_tokenizer()
    model_name = getattr(model.config, "name_or_path", "") or type(model).__name__
    root = adapters_root(config, model_name)
    directories = {}
    for index, name in enumerate(names):
        task = TASKS[name]
        directory = root / name
        directories[name] = directory
        if _is_complete(directory, task):
            continue
        if progress:
            print(f"training {name} ({index + 1}/{len(names)}) into {directory}", flush=True)
        peft_model = train_adapter(model, tokenizer, task, config, progress=progress)
        staging = directory.with_name(f"{name}.tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        peft_model.save_pretrained(staging)
        log = peft_model.training_log
        metadata = {"task": name, "task_fingerprint": task.fingerprint(), "model": model_name,
                    "config": dataclasses.asdict(config), "seconds": log["seconds"],
                    "seconds_per_step": log["seconds"] / config.steps,
                    "final_loss": sum(log["loss"][-10:]) / len(log["loss"][-10:]), "loss": log["loss"],
                    "threads": torch.get_num_threads()}
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
        model = peft_model.unload()
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)
    return directories

