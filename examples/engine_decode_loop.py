"""A serving engine's decode loop on ``lolakernels.serving``: fused projections, one ``LoraBatch``
per step, one ``add_lora`` per projection.

The engine owns a Llama model's weights the way serving engines lay them out: q/k/v fused into one
``qkv`` projection and gate/up into one ``gate_up`` projection, a KV cache it manages itself, and
one ``LoraSlot`` per projection holding every adapter of an AdapterBank by output slices. Each step:

    batch.prepare(adapter_ids, seq_lens)           # host: ids checked, one host-to-device copy
    for layer in layers:
        qkv = h @ w_qkvᵀ;     add_lora(qkv, h, layer.qkv, batch)         # 3 output slices
        ...attention over the cache...
        o = a @ w_oᵀ;         add_lora(o, a, layer.o, batch)
        gu = h @ w_gate_upᵀ;  add_lora(gu, h, layer.gate_up, batch)     # 2 output slices
        d = act @ w_downᵀ;    add_lora(d, act, layer.down, batch)

These are the calls vLLM's LoRA layers make (``add_lora_linear`` with ``output_slices``); nothing in
a step depends on the ids' values, so a step can be captured in a CUDA graph. The script checks its
greedy generations against ``lolakernels.peft.attach_bank`` on the transformers model.

    python examples/engine_decode_loop.py            # SmolLM2-135M-Instruct when installed
    python examples/engine_decode_loop.py --tiny     # a small random Llama
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lolakernels.serving import LoraBatch, add_lora
from lolakernels.serving.layers import LoraSlot


@dataclass
class EngineLayer:
    """One decoder layer's fused weights and LoRA slots."""

    w_qkv: Tensor
    w_o: Tensor
    w_gate_up: Tensor
    w_down: Tensor
    qkv: LoraSlot
    o: LoraSlot
    gate_up: LoraSlot
    down: LoraSlot
    input_norm: torch.nn.Module
    post_attention_norm: torch.nn.Module


class FusedLlamaEngine:
    """Greedy decoding of equal-length prompts, one token per sequence per step, with a
    preallocated KV cache and LoraBatch (sizes fixed at construction, as for graph capture)."""

    def __init__(self, model, bank, *, max_sequences: int, max_length: int):
        config = model.config
        self.model = model
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        dtype = model.dtype
        device = model.device
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.layers = []
        for index, layer in enumerate(model.model.layers):
            attention, mlp = layer.self_attn, layer.mlp
            prefix = f"model.layers.{index}"

            def slot(names, sizes, prefix=prefix):
                paths = [f"{prefix}.{name}" for name in names]
                return LoraSlot.from_bank(bank, paths, output_sizes=sizes, dtype=dtype, device=device)

            self.layers.append(EngineLayer(
                w_qkv=torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]).detach(),
                w_o=attention.o_proj.weight.detach(),
                w_gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                w_down=mlp.down_proj.weight.detach(),
                qkv=slot(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], [q_size, kv_size, kv_size]),
                o=slot(["self_attn.o_proj"], [config.hidden_size]),
                gate_up=slot(["mlp.gate_proj", "mlp.up_proj"], [config.intermediate_size] * 2),
                down=slot(["mlp.down_proj"], [config.hidden_size]),
                input_norm=layer.input_layernorm, post_attention_norm=layer.post_attention_layernorm))
        shape = (len(self.layers), max_sequences, self.num_kv_heads, max_length, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.batch = LoraBatch(max_tokens=max_sequences, num_adapters=len(bank.adapter_names), device=device)

    @torch.no_grad()
    def step(self, tokens: Tensor, position: int) -> Tensor:
        """Logits ``[S, vocab]`` for one new token per sequence at ``position``; the LoraBatch
        must have been prepared for these S sequences."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        count = tokens.shape[0]
        hidden = self.model.model.embed_tokens(tokens)                       # [S, d]
        positions = torch.full((count, 1), position, device=tokens.device)
        cos, sin = self.model.model.rotary_emb(hidden[:, None], positions)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        for index, layer in enumerate(self.layers):
            h = layer.input_norm(hidden)
            qkv = add_lora(F.linear(h, layer.w_qkv), h, layer.qkv, self.batch)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=1)
            q = q.view(count, self.num_heads, 1, self.head_dim)
            k = k.view(count, self.num_kv_heads, 1, self.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.keys[index, :count, :, position] = k[:, :, 0]
            self.values[index, :count, :, position] = v.view(count, self.num_kv_heads, self.head_dim)
            attended = F.scaled_dot_product_attention(
                q, self.keys[index, :count, :, :position + 1], self.values[index, :count, :, :position + 1],
                enable_gqa=True).reshape(count, q_size)
            hidden = hidden + add_lora(F.linear(attended, layer.w_o), attended, layer.o, self.batch)
            h = layer.post_attention_norm(hidden)
            gate_up = add_lora(F.linear(h, layer.w_gate_up), h, layer.gate_up, self.batch)
            gate, up = gate_up.chunk(2, dim=1)
            act = F.silu(gate) * up
            hidden = hidden + add_lora(F.linear(act, layer.w_down), act, layer.down, self.batch)
        return self.model.lm_head(self.model.model.norm(hidden))

    def generate(self, prompts: Tensor, adapter_ids, new_tokens: int) -> Tensor:
        """Greedy continuation of ``prompts [S, L]`` (no padding), sequence s with adapter_ids[s]."""
        count, length = prompts.shape
        # The running set does not change in this loop; an engine whose batch changes calls
        # prepare() at the start of every step.
        self.batch.prepare(adapter_ids, [1] * count)
        tokens = prompts
        logits = None
        for position in range(length):  # the prompt, one token per step (prefill as decode)
            logits = self.step(prompts[:, position], position)
        for position in range(length, length + new_tokens):
            next_token = logits.argmax(dim=-1)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if position == length + new_tokens - 1:
                break
            logits = self.step(next_token, position)
        return tokens


def build(tiny: bool, num_adapters: int = 4, rank: int = 8):
    """(model, tokenizer or None, bank of random adapters compressed with JD-Full)."""
    import peft
    from peft.utils import get_peft_model_state_dict

    import lolakernels
    from lolakernels import models

    if tiny or models.smollm2_missing_reason() is not None:
        model, tokenizer = models.tiny_llama(), None
    else:
        model, tokenizer = models.load_smollm2(torch.float32), models.load_smollm2_tokenizer()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapters = {}
    generator = torch.Generator().manual_seed(0)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                           target_modules=targets))
    for i in range(num_adapters):
        with torch.no_grad():
            for module in peft_model.modules():
                if isinstance(module, peft.tuners.lora.LoraLayer):
                    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                    a.copy_(torch.randn(a.shape, generator=generator) / a.shape[1] ** 0.5)
                    b.copy_(torch.randn(b.shape, generator=generator) * 0.05 / b.shape[1] ** 0.5)
        adapters[f"adapter{i}"] = (peft_model.peft_config["default"],
                                   {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()})
    bank = lolakernels.compress_adapters(adapters, rank=2 * rank, method="jd-full", progress=False)
    return model, tokenizer, bank


def main() -> None:
    from lolakernels.peft import attach_bank

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small random Llama instead of SmolLM2")
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    model, tokenizer, bank = build(args.tiny)
    if tokenizer is not None:
        text = ["The quick brown fox jumps", "Python lists are mutable and", "A good cup of tea needs",
                "The capital of France is"]
        prompts = torch.stack([torch.tensor(tokenizer(t)["input_ids"][:4]) for t in text])
    else:
        prompts = torch.randint(0, model.config.vocab_size, (4, 4), generator=torch.Generator().manual_seed(1))
    adapter_ids = [0, -1, 2, 3]
    engine = FusedLlamaEngine(model, bank, max_sequences=8, max_length=prompts.shape[1] + args.new_tokens)
    started = time.perf_counter()
    tokens = engine.generate(prompts, adapter_ids, args.new_tokens)
    seconds = time.perf_counter() - started
    reference = attach_bank(copy.deepcopy(model), bank).generate(
        prompts, attention_mask=torch.ones_like(prompts), adapter_ids=adapter_ids, max_new_tokens=args.new_tokens,
        do_sample=False)
    for row, adapter in enumerate(adapter_ids):
        shown = tokenizer.decode(tokens[row]) if tokenizer is not None else tokens[row].tolist()
        print(f"adapter {adapter:>2}: {shown!r}")
    print(f"engine: {tokens.numel() - prompts.numel()} new tokens in {seconds:.2f} s; "
          f"same tokens as attach_bank + generate(): {torch.equal(tokens, reference)}")


if __name__ == "__main__":
    main()
