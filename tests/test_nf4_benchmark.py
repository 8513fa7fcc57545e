"""The nf4 benchmark's report: every row with its own bandwidth and the fractions taken from it."""
import json

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from lolakernels.benchmarking import nf4  # noqa: E402


def test_run_writes_each_row_with_its_own_bandwidth(tmp_path):
    configs = [nf4.Config(256, 192, 1, "float32"), nf4.Config(256, 192, 4, "bfloat16")]
    # One short round per method: the test checks the report, not the speed.
    rows, table = nf4.run(configs, tmp_path, stem="nf4_test", progress=False, rounds=1, min_seconds=0.0)
    payload = json.loads((tmp_path / "nf4_test.json").read_text())
    assert "read_bandwidth_bytes_per_s" not in payload  # no single measurement for the whole run
    assert len(payload["rows"]) == len(rows) == 2
    for row in rows:
        bandwidth = row["read_bandwidth_bytes_per_s"]
        assert bandwidth > 0 and "stream_ms" not in row
        assert row["fraction_of_bandwidth_cold"] == pytest.approx(row["bytes_read"] / (row["ours_cold_ms"] / 1e3)
                                                                  / bandwidth)
        assert row["max_rel_diff_vs_dense_peft"] < (1e-5 if row["dtype"] == "float32" else 2e-2)
    assert "| GB/s | bandwidth (cold) |" in table
    assert (tmp_path / "nf4_test.md").read_text() == table
    gbs = sorted(f"{row['read_bandwidth_bytes_per_s'] / 1e9:.1f}" for row in rows)
    assert f"{gbs[0]}–{gbs[1]} GB/s in this run" in table
