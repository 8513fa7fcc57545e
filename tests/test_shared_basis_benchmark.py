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


def test_passes_pool_their_samples_into_one_row(tmp_path):
    """Each config is measured once per pass; the row's medians are over every pass's samples, and
    each pass's own added time is kept and shown as the row's range."""
    configs = [shared_basis.Config("float32", 1, 4, 3, 5, 64, 48), shared_basis.Config("bfloat16", 2, 5, 4, 6, 40, 64)]
    calls = []
    real_measure = shared_basis.measure_config

    def measure(cfg, *args, **kwargs):
        calls.append(cfg)
        return real_measure(cfg, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(shared_basis, "measure_config", measure)
        rows, table = shared_basis.run(configs, tmp_path, with_peft=False, stem="passes", progress=False,
                                       samples=3, passes=2)
    # The whole grid once per pass, not each config twice in a row.
    assert calls == [configs[1], configs[0], configs[1], configs[0]]
    payload = json.loads((tmp_path / "passes.json").read_text())
    assert payload["passes"] == 2
    for row in rows:
        assert row["passes"] == 2 and len(row["shared_added_pct_by_pass"]) == 2
        low, high = min(row["shared_added_pct_by_pass"]), max(row["shared_added_pct_by_pass"])
        assert f"{row['shared_added_pct']:+.1f}% ({low:+.1f} to {high:+.1f})" in table
    with pytest.raises(ValueError, match="passes must be at least 1"):
        shared_basis.run(configs, None, with_peft=False, progress=False, passes=0)


def test_row_of_pools_the_samples_of_every_pass():
    """A row's added time is the median of (fn − base) over the samples of all passes together."""
    cfg = shared_basis.Config("float32", 1, 4, 3, 5, 64, 48)
    probe = timing.StreamProbe()

    def one_pass(base, shared):
        cold = {timing.BASE: base, "shared": shared, "composition": shared, "shared_lora_only": shared,
                "stream": [1.0] * len(base)}
        return {"errors": {}, "warm": {"base": 1.0, "shared_lora_only": 0.5}, "cold": cold,
                "layers": ["shared", "composition"], "lora_bytes": 1000}

    first = one_pass([1.0, 1.0, 1.0], [1.1, 1.1, 1.1])  # adds 10%
    second = one_pass([2.0, 2.0], [2.6, 2.6])  # adds 30% of a slower base
    row = shared_basis.row_of(cfg, [first, second], probe)
    assert row["base_cold_ms"] == pytest.approx(1000.0)  # median of 1, 1, 1, 2, 2 s
    assert row["shared_added_ms"] == pytest.approx(100.0)  # median of 0.1, 0.1, 0.1, 0.6, 0.6 s
    assert row["shared_added_pct_by_pass"] == pytest.approx([10.0, 30.0])
    assert row["read_bandwidth_bytes_per_s"] == pytest.approx(probe.num_bytes)


def test_decode_grid_is_one_adapter_per_token():
    grid = shared_basis.decode_grid()
    assert {(c.tokens, c.adapters) for c in grid} == {(16, 16), (64, 64), (256, 256)}
    assert {c.clusters for c in grid} == {1} and {c.dtype for c in grid} == {"float32", "bfloat16"}
