"""The serving benchmark's result files: a rerun of some configurations merges into the rows an
earlier run wrote instead of replacing the file."""
import json

from lolakernels.benchmarking import serving


def measured(dtype: str, adapters: int, tokens_per_s: float) -> dict:
    row = {field: getattr(serving.Config(dtype, adapters, 256), field) for field in serving.Config.__dataclass_fields__}
    row.update(peft_tokens_per_s=tokens_per_s / 2, accelerate_tokens_per_s=tokens_per_s, bank_tokens_per_s=tokens_per_s,
               compress_seconds=1.0, bank_vs_one_adapter=0.97)
    return row


def test_rerun_rows_replace_their_configuration_and_keep_the_others():
    earlier = [measured("float32", 1, 100.0), measured("float32", 8, 90.0), measured("bfloat16", 1, 50.0)]
    rerun = [measured("bfloat16", 1, 60.0), measured("bfloat16", 8, 55.0)]
    rows = serving.merged_rows(earlier, rerun)
    assert [(r["dtype"], r["adapters"], r["bank_tokens_per_s"]) for r in rows] == [
        ("float32", 1, 100.0), ("float32", 8, 90.0), ("bfloat16", 1, 60.0), ("bfloat16", 8, 55.0)]


def test_table_relates_each_row_to_its_own_dtypes_single_adapter_row():
    rows = [measured("float32", 1, 100.0), measured("float32", 256, 95.0), measured("bfloat16", 1, 40.0),
            measured("bfloat16", 256, 20.0)]
    rows[1]["transcribed_from_output"] = True
    del rows[1]["compress_seconds"], rows[1]["bank_vs_one_adapter"]
    table = serving.markdown_table(rows, "test machine")
    lines = [line for line in table.splitlines() if line.startswith("| float32") or line.startswith("| bfloat16")]
    assert "| 100% | 97% |" in lines[0] and "| 50% | 97% |" in lines[3]
    assert "| 2.00× | 2.00× |" in lines[0]
    assert lines[1].startswith("| float32 †") and lines[1].endswith("| 95% | – | – |") and "† transcribed" in table


def test_results_are_written_after_each_configuration(tmp_path, monkeypatch):
    monkeypatch.setattr(serving, "run_config", lambda cfg, model, progress: measured(cfg.dtype, cfg.adapters, 10.0 * cfg.adapters))
    monkeypatch.setattr(serving, "plot", lambda rows, path: None)
    (tmp_path / "s.json").write_text(json.dumps({"rows": [measured("float32", 1, 7.0)]}))
    written = []
    real_write = serving.write_results
    monkeypatch.setattr(serving, "write_results",
                        lambda *args: written.append(len(args[2]["rows"])) or real_write(*args))

    class Model:
        class config:
            name_or_path = "tiny"

    serving.run([serving.Config("bfloat16", 1, 256), serving.Config("bfloat16", 8, 256)], tmp_path, stem="s",
                model=Model(), progress=False)
    assert written == [2, 3]
    saved = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [(r["dtype"], r["adapters"]) for r in saved] == [("float32", 1), ("bfloat16", 1), ("bfloat16", 8)]
