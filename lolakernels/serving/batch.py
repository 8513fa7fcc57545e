"""``LoraBatch``: the per-step adapter metadata of a serving engine, built once per forward step.

For S sequences laid out one after another (``T = Σ_s L_s`` tokens), sequence s having adapter
``a_s`` (-1 = base model only) and ``L_s`` tokens in this step (prompt length in prefill, 1 in
decode):

    token_adapter_ids[t]   = a_s for each token t of sequence s        [max_tokens] int32
                           = -1 for t ≥ T (padding up to a captured batch size)
    segment_starts[k]      first token of the k-th maximal run of tokens with one adapter
                           [max_sequences + 1] int32, entries past the last segment = T
    segment_adapter_ids[k] that run's adapter                           [max_sequences] int32, else -1

The buffers are allocated once, for the largest step, on the engine's device. ``prepare`` checks
the ids on the host (the only place they are checked) and writes every buffer with one
host-to-device copy, so layers read device tensors of fixed shapes: no host sync per layer and no
launch grid that depends on the data, which is what CUDA-graph capture of a step needs. Layers read
``token_adapter_ids[:T]`` through ``lolakernels.serving.add_lora``.

This is the counterpart of vLLM's punica-wrapper metadata (token → LoRA index mapping, prefill
segment starts / lengths / LoRA index per segment).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

IdsLike = Union[Sequence[int], Tensor]


def _host_ints(name: str, values: IdsLike) -> Tensor:
    """1-D int64 CPU tensor from a sequence or tensor of integers (TypeError otherwise)."""
    if isinstance(values, Tensor):
        if values.dtype.is_floating_point or values.dtype == torch.bool or values.is_complex():
            raise TypeError(f"{name} must hold integers, got a {values.dtype} tensor")
        tensor = values.detach().to("cpu", torch.int64)
    else:
        try:
            items = list(values)
        except TypeError:
            raise TypeError(f"{name} must be a sequence or 1-D tensor of ints, got {type(values).__name__}") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            bad = next(v for v in items if not isinstance(v, int) or isinstance(v, bool))
            raise TypeError(f"{name} must hold ints, got {bad!r} ({type(bad).__name__})")
        tensor = torch.tensor(items, dtype=torch.int64)
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one entry per sequence), got shape {list(tensor.shape)}")
    return tensor


class LoraBatch:
    """Per-step token → adapter map and segments for a fixed maximum batch (see module docstring).

    Args:
        max_tokens: the most tokens one step may hold (buffers are this long).
        num_adapters: N; valid adapter ids are ``-1 .. N-1`` (the rows of the engine's LoRA weights).
        max_sequences: the most sequences per step (default ``max_tokens``).
        device: where the layers run.

    Typical step::

        batch.prepare(adapter_ids=[3, -1, 3, 7], seq_lens=[1, 1, 1, 1])   # decode, 4 sequences
        for layer in layers:
            qkv = x @ w_qkv.T
            add_lora(qkv, x, layer.qkv_slot, batch)
    """

    def __init__(self, max_tokens: int, num_adapters: int, *, max_sequences: Optional[int] = None,
                 device: Union[str, torch.device, None] = None):
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if not isinstance(num_adapters, int) or num_adapters < 0:
            raise ValueError(f"num_adapters must be an int >= 0, got {num_adapters!r}")
        max_sequences = max_tokens if max_sequences is None else max_sequences
        if not isinstance(max_sequences, int) or max_sequences < 1:
            raise ValueError(f"max_sequences must be a positive int, got {max_sequences!r}")
        self.max_tokens = max_tokens
        self.max_sequences = max_sequences
        self.num_adapters = num_adapters
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # One buffer, so that prepare() is a single host-to-device copy.
        self._buffer = torch.full((self._buffer_size(),), -1, dtype=torch.int32, device=self.device)
        self.token_adapter_ids = self._buffer[:max_tokens]
        self.segment_starts = self._buffer[max_tokens:max_tokens + max_sequences + 1]
        self.segment_adapter_ids = self._buffer[max_tokens + max_sequences + 1:]
        self.segment_starts.zero_()
        self.num_tokens = 0
        self.num_sequences = 0
        self.num_segments = 0
        self.has_adapters = False

    def _buffer_size(self) -> int:
        return self.max_tokens + 2 * self.max_sequences + 1

    def __repr__(self) -> str:
        return (f"LoraBatch(tokens={self.num_tokens}/{self.max_tokens}, sequences={self.num_sequences}/"
                f"{self.max_sequences}, segments={self.num_segments}, adapters={self.num_adapters}, device={self.device})")

    def prepare(self, adapter_ids: IdsLike, seq_lens: Optional[IdsLike] = None) -> "LoraBatch":
        """Fills the buffers for one step and returns ``self``.

        Args:
            adapter_ids: ``[S]`` adapter of each sequence, -1 = base model only.
            seq_lens: ``[S]`` tokens of each sequence in this step (default: 1 each, a decode step).

        Raises ``ValueError`` (naming the argument) for ids outside ``[-1, num_adapters)``,
        lengths that are negative or do not match, or more tokens / sequences than allocated;
        ``TypeError`` for non-integer input. Host inputs are expected (schedulers hold them there);
        a device tensor is copied to the host, which waits for it.
        """
        ids = _host_ints("adapter_ids", adapter_ids)
        num_sequences = ids.shape[0]
        lens = torch.ones(num_sequences, dtype=torch.int64) if seq_lens is None else _host_ints("seq_lens", seq_lens)
        if lens.shape[0] != num_sequences:
            raise ValueError(f"seq_lens has {lens.shape[0]} entries but adapter_ids has {num_sequences} "
                             "(one per sequence)")
        if num_sequences > self.max_sequences:
            raise ValueError(f"adapter_ids has {num_sequences} sequences > max_sequences = {self.max_sequences}")
        if num_sequences and (ids.min() < -1 or ids.max() >= self.num_adapters):
            bad = ids[(ids < -1) | (ids >= self.num_adapters)][0].item()
            raise ValueError(f"adapter_ids must lie in [-1, {self.num_adapters}) (-1 = base model; "
                             f"{self.num_adapters} adapters), got {bad}")
        if num_sequences and lens.min() < 0:
            raise ValueError(f"seq_lens must be >= 0, got {lens.min().item()}")
        num_tokens = int(lens.sum())
        if num_tokens > self.max_tokens:
            raise ValueError(f"seq_lens add up to {num_tokens} tokens > max_tokens = {self.max_tokens}")

        host = torch.full((self._buffer_size(),), -1, dtype=torch.int32)
        host[:num_tokens] = torch.repeat_interleave(ids, lens).to(torch.int32)
        # Segments: merge neighbouring sequences with the same adapter; empty sequences vanish.
        nonempty = lens > 0
        seg_ids, seg_lens = ids[nonempty], lens[nonempty]
        if seg_ids.numel():
            new_run = torch.ones_like(seg_ids, dtype=torch.bool)
            new_run[1:] = seg_ids[1:] != seg_ids[:-1]
            run_index = torch.cumsum(new_run.long(), 0) - 1
            num_segments = int(run_index[-1]) + 1
            run_lens = torch.zeros(num_segments, dtype=torch.int64).index_add_(0, run_index, seg_lens)
            run_ids = seg_ids[new_run]
        else:
            num_segments, run_lens, run_ids = 0, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        starts = host[self.max_tokens:self.max_tokens + self.max_sequences + 1]
        starts.fill_(num_tokens)
        starts[0] = 0
        starts[1:num_segments + 1] = torch.cumsum(run_lens, 0).to(torch.int32)
        host[self.max_tokens + self.max_sequences + 1:][:num_segments] = run_ids.to(torch.int32)

        if self.device.type == "cpu":
            self._buffer.copy_(host)
        else:
            self._buffer.copy_(host.pin_memory(), non_blocking=True)
        self.num_tokens = num_tokens
        self.num_sequences = num_sequences
        self.num_segments = num_segments
        self.has_adapters = bool((ids[nonempty] >= 0).any()) if num_sequences else False
        return self

    def token_ids(self, num_tokens: Optional[int] = None) -> Tensor:
        """``token_adapter_ids[:num_tokens]`` (default: the tokens of the last ``prepare``); a view
        of the fixed buffer, so a captured graph sees each step's ids."""
        count = self.num_tokens if num_tokens is None else num_tokens
        if count > self.max_tokens:
            raise ValueError(f"{count} tokens > max_tokens = {self.max_tokens} of this LoraBatch")
        return self.token_adapter_ids[:count]


__all__ = ["LoraBatch"]
