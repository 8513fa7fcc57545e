"""The shared-basis benchmark's measurement: cold, paired timing and the report it writes."""
import json

import pytest
import torch

from lolakernels.benchmarking import shared_basis, timing


def test_cold_paired_seconds_flushes_and_primes_before_every_timed_call():
    events = []
    fns = {"lora": lambda: events.append("lora"), "other": lambda: events.append("other")}
    primes = {"base": lambda: events.append("prime base"), "lora": lambda: events.append("prime lora")}
    base_seconds, seconds, added = timing.cold_paired_seconds(
        lambda: events.append("base"), fns, samples=4, flush=lambda: events.append("flush"), primes=primes)
    timed = events[3:]  # after one warm-up call of each
    assert events[:3] == ["base", "lora", "other"]
    # Every timed call comes right after a flush, and after its prime where it has one.
    for index, event in enumerate(timed):
        if event in ("base", "lora"):
            assert timed[index - 1] == f"prime {event}" and timed[index - 2] == "flush"
        elif event == "other":
            assert timed[index - 1] == "flush"
    assert timed.count("flush") == 4 * 3
    # The order rotates, so no fn always runs first after the base GEMM.
    firsts = [timed[i + 1 + (timed[i + 1] == "prime base") + (timed[i + 1] == "prime lora")]
              for i in range(0, len(timed), len(timed) // 4)]
    assert len(set(firsts)) > 1
    assert set(seconds) == set(added) == {"lora", "other"}
    assert base_seconds >= 0 and all(value >= 0 for value in seconds.values())


def test_stream_probe_reads_four_times_the_last_level_cache():
    probe = timing.StreamProbe("cpu")
    assert probe.num_bytes == 4 * timing.last_level_cache_bytes()
    probe()
    assert probe.bytes_per_second(0.5) == probe.num_bytes / 0.5


def test_cache_flush_reads_more_than_the_last_level_cache():
    flush = timing.CacheFlush("cpu")
    assert flush._buffer.numel() * 4 >= 3 * timing.last_level_cache_bytes()
    flush()


@pytest.mark.parametrize("with_peft", [False, True])
def test_run_writes_every_config_with_exact_numbers(tmp_path, with_peft):
    configs = [shared_basis.Config("float32", 1, 4, 3, 5, 64, 48), shared_basis.Config("bfloat16", 2, 5, 4, 6, 40, 64)]
    rows, table = shared_basis.run(configs, tmp_path, with_peft=with_peft, stem="tiny", progress=False, samples=2)
    assert len(rows) == 2
    assert sum(line.startswith(("| float32 |", "| bfloat16 |")) for line in table.splitlines()) == 2
    payload = json.loads((tmp_path / "tiny.json").read_text())
    assert (tmp_path / "tiny.md").read_text() == table
    assert [(r["dtype"], r["clusters"]) for r in payload["rows"]] == [("bfloat16", 2), ("float32", 1)]
    for row in rows:
        for key in ("base_cold_ms", "shared_added_pct", "composition_added_pct", "shared_lora_only_ms",
                    "shared_lora_only_cold_ms", "lora_fraction_of_bandwidth", "read_bandwidth_bytes_per_s",
                    "lora_bytes_floor_pct"):
            assert isinstance(row[key], float), key
        assert row["read_bandwidth_bytes_per_s"] > 0
        assert not any("stream" in key for key in row)  # the probe is timed, not reported as a layer
        # The floor is the row's LoRA bytes at the row's own bandwidth, over its base GEMM.
        expected = 100 * row["lora_bytes"] / row["read_bandwidth_bytes_per_s"] / row["base_cold_ms"] * 1e3
        assert row["lora_bytes_floor_pct"] == pytest.approx(expected)
    fp32 = rows[1]
    assert ("multi_lora_added_pct" in fp32) and ("multi_lora_added_pct" not in rows[0])  # C = 8 has no multi_lora
    if with_peft:
        assert fp32["max_rel_error_multi_lora_vs_peft"] < 1e-5
        assert fp32["max_rel_error_shared_vs_peft"] < 1e-5
    else:
        assert "peft_added_pct" not in fp32
    assert "| float32 | 1 | 4 | 3 | 5 |" in table
    assert "float32 | 1 | 4 | 3 | 5" in shared_basis.summary_table(payload, decode=True)


def test_decode_grid_is_one_adapter_per_token():
    grid = shared_basis.decode_grid()
    assert {(c.tokens, c.adapters) for c in grid} == {(16, 16), (64, 64), (256, 256)}
    assert {c.clusters for c in grid} == {1} and {c.dtype for c in grid} == {"float32", "bfloat16"}
