"""Perplexity on packaged English text, and the LoRAP study built on it.

Text: ``lolakernels.corpus.english_text()`` (the Python documentation's topic pages shipped in
``pydoc_data``), split at a paragraph boundary near its middle. Calibration sequences are taken
from the first half, perplexity is measured on the second half only, so the two never overlap.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import corpus


@dataclass(frozen=True)
class TextSplit:
    """Token windows for calibration and for held-out evaluation, and where they came from."""

    calibration: Tensor  # [N, T]
    heldout: Tensor  # [M, T]
    split_char: int  # calibration text = text[:split_char], held-out = text[split_char:]
    text_chars: int

    def describe(self) -> str:
        n, t = self.calibration.shape
        m = self.heldout.shape[0]
        return (f"corpus.english_text() ({self.text_chars:,} characters of the Python documentation in pydoc_data): "
                f"{n} calibration sequences of {t} tokens from characters [0, {self.split_char:,}), "
                f"perplexity on {m} held-out windows of {t} tokens ({m * t:,} tokens) from characters "
                f"[{self.split_char:,}, {self.text_chars:,})")


def _evenly_spaced_windows(tokens: Tensor, seq_len: int, count: int) -> Tensor:
    """``count`` non-overlapping windows of ``seq_len`` tokens spread evenly over ``tokens``."""
    available = tokens.numel() // seq_len
    if available < count:
        raise ValueError(f"the text yields only {available} windows of {seq_len} tokens, {count} requested")
    windows = tokens[: available * seq_len].view(available, seq_len)
    picks = torch.linspace(0, available - 1, count).round().long()
    return windows[picks]


def split_text(tokenizer, *, seq_len: int = 256, calibration_sequences: int = 32,
               heldout_sequences: int = 32) -> TextSplit:
    """Tokenizes the two halves of the packaged English text separately (no window crosses the
    split) and picks evenly spaced windows from each."""
    text = corpus.english_text()
    split_char = text.find("\n\n", len(text) // 2)
    split_char = len(text) // 2 if split_char < 0 else split_char

    def token_ids(part: str) -> Tensor:
        return torch.tensor(tokenizer(part, add_special_tokens=False)["input_ids"], dtype=torch.long)

    calibration = _evenly_spaced_windows(token_ids(text[:split_char]), seq_len, calibration_sequences)
    heldout = _evenly_spaced_windows(token_ids(text[split_char:]), seq_len, heldout_sequences)
    return TextSplit(calibration, heldout, split_char, len(text))


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: Tensor, *, batch_size: int = 4) -> float:
    """``exp(mean next-token negative log-likelihood)`` over every predicted token of
    ``input_ids [N, T]`` (each window on its own: ``N (T − 1)`` predictions)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, input_ids.shape[0], batch_size):
        batch = input_ids[start:start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return math.exp(total / count)


def run_lorap_study(model: nn.Module, split: TextSplit, ratios: Sequence[float], decos: Sequence[str], *,
                    mlp: str = "prune", para_allocate: float = 3.0, progress: bool = True,
                    log: Callable[[str], None] = print) -> dict:
    """Perplexity of ``model`` before, and after ``lorap`` at each (deco, ratio), on held-out
    text. Calibration statistics are gathered once from the uncompressed model; each
    compression runs on a deep copy, so ``model`` is left untouched."""
    from ..compress import activation_stats
    from ..compress.lorap_pipeline import lorap, projection_names

    started = time.perf_counter()
    base_ppl = perplexity(model, split.heldout)
    log(f"uncompressed: perplexity {base_ppl:.3f}")
    statistics = activation_stats.collect(model, split.calibration, projection_names(model), progress=progress)
    rows = []
    for ratio in ratios:
        for deco in decos:
            begin = time.perf_counter()
            compressed, report = lorap(copy.deepcopy(model), None, ratio, para_allocate=para_allocate, mlp=mlp,
                                       deco=deco, progress=False, statistics=statistics)
            seconds = time.perf_counter() - begin
            ppl = perplexity(compressed, split.heldout)
            rows.append({"ratio": ratio, "deco": deco, "mlp": mlp, "para_allocate": para_allocate,
                         "perplexity": ppl, "achieved_ratio": report.achieved_ratio,
                         "model_ratio": report.model_ratio, "decoder_params_before": report.decoder_params_before,
                         "decoder_params_after": report.decoder_params_after, "compress_seconds": seconds,
                         "report": report.table()})
            log(f"ratio {ratio:.2f} {deco:>5}: perplexity {ppl:.3f} (removed {100 * report.achieved_ratio:.1f}% "
                f"of decoder-layer parameters, compression {seconds:.1f} s)")
            del compressed
    return {"uncompressed_perplexity": base_ppl, "rows": rows, "data": split.describe(),
            "total_seconds": time.perf_counter() - started}


def study_markdown(payload: dict) -> str:
    """The study's table: perplexity per ratio for awsvd and plain svd, and the rank layout."""
    rows = payload["rows"]
    by_ratio: dict[float, dict[str, dict]] = {}
    for row in rows:
        by_ratio.setdefault(row["ratio"], {})[row["deco"]] = row
    lines = [
        f"# LoRAP on {payload['model']}",
        "",
        f"Machine: {payload['machine']}. torch {payload['torch']}, transformers {payload['transformers']}.",
        f"Data: {payload['data']}.",
        (f"MLP: {rows[0]['mlp']}, para_allocate = {rows[0]['para_allocate']}. Uncompressed perplexity: "
         f"**{payload['uncompressed_perplexity']:.3f}**."),
        "",
        "| ratio requested | decoder params removed | perplexity, awsvd | perplexity, plain svd | svd / awsvd |",
        "|---|---|---|---|---|",
    ]
    for ratio in sorted(by_ratio):
        cells = by_ratio[ratio]
        awsvd_row, svd_row = cells.get("awsvd"), cells.get("svd")
        removed = (awsvd_row or svd_row)["achieved_ratio"]
        ppl = lambda row: "–" if row is None else f"{row['perplexity']:.3f}"  # noqa: E731
        quotient = (f"{svd_row['perplexity'] / awsvd_row['perplexity']:.2f}×" if awsvd_row and svd_row else "–")
        lines.append(f"| {ratio:.2f} | {100 * removed:.1f}% | {ppl(awsvd_row)} | {ppl(svd_row)} | {quotient} |")
    lines += ["", "Parameter layout per ratio (both decompositions use the same ranks):", ""]
    for ratio in sorted(by_ratio):
        row = next(iter(by_ratio[ratio].values()))
        lines += [f"### ratio {ratio:.2f}", "", row["report"]]
    return "\n".join(lines)


def write_study(payload: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    from .timing import write_results

    return write_results(out_dir, stem, payload, study_markdown(payload))
