"""benchmarks.exporter: targets, latency ratios, the tfmot skip, and a tiny end-to-end run."""

import json
import os

import pytest

from benchmarks import exporter as bench
from benchmarks import overhead as benchmark_overhead


def _row(name, kind, path, **values):
    row = {
        "name": name,
        "kind": kind,
        "tflite": path,
        "top1_agreement": None,
        "identical_output_codes": None,
        "size_ratio": None,
    }
    row.update(values)
    return row


def test_add_latency_ratios_to_tfmot_and_float_per_thread_count():
    rows = [
        _row("ours", "int4", "ours.tflite"),
        _row("tfmot", "tfmot_int8", "tfmot.tflite"),
        _row("float", "float", "float.tflite"),
    ]
    timings = [
        {"model": "ours.tflite", "threads": 1, "median_us": 90.0, "p90_us": 95.0},
        {"model": "tfmot.tflite", "threads": 1, "median_us": 100.0, "p90_us": 110.0},
        {"model": "float.tflite", "threads": 1, "median_us": 300.0, "p90_us": 310.0},
        {"model": "ours.tflite", "threads": 2, "median_us": 66.0, "p90_us": 70.0},
        {"model": "tfmot.tflite", "threads": 2, "median_us": 60.0, "p90_us": 61.0},
        {"model": "float.tflite", "threads": 2, "median_us": 165.0, "p90_us": 170.0},
    ]
    bench.add_latency(rows, timings)
    assert sorted(rows[0]["latency"]) == ["1", "2"]
    assert rows[0]["latency"]["1"]["ratio_to_tfmot_int8"] == pytest.approx(0.9)
    assert rows[0]["latency"]["2"]["ratio_to_tfmot_int8"] == pytest.approx(1.1)
    assert rows[0]["latency"]["1"]["ratio_to_float"] == pytest.approx(0.3)
    assert rows[1]["latency"]["2"]["ratio_to_tfmot_int8"] == pytest.approx(1.0)
    assert rows[2]["latency"]["2"]["ratio_to_float"] == pytest.approx(1.0)


def test_add_latency_without_tfmot_leaves_its_ratio_empty():
    rows = [_row("ours", "int4", "a.tflite"), _row("float", "float", "b.tflite")]
    timings = [
        {"model": "a.tflite", "threads": 1, "median_us": 50.0, "p90_us": 55.0},
        {"model": "b.tflite", "threads": 1, "median_us": 200.0, "p90_us": 210.0},
    ]
    bench.add_latency(rows, timings)
    assert rows[0]["latency"]["1"]["ratio_to_tfmot_int8"] is None
    assert rows[0]["latency"]["1"]["ratio_to_float"] == pytest.approx(0.25)


def test_check_targets_compares_each_value_with_its_threshold():
    rows = [
        _row(
            "q INT4 weights",
            "int4",
            "q.tflite",
            top1_agreement=0.9995,
            identical_output_codes=0.95,
            size_ratio=0.61,
            latency={"1": {"ratio_to_tfmot_int8": 1.04}, "2": {"ratio_to_tfmot_int8": None}},
        ),
        _row("q INT8 weights", "int8_weights", "q8.tflite", latency={}),
        _row("float", "float", "f.tflite", latency={"1": {"ratio_to_tfmot_int8": 3.0}}),
    ]
    met = {(c["target"], c["subject"]): c["met"] for c in bench.check_targets(rows)}
    assert met == {
        ("top1_agreement", "q INT4 weights"): True,
        ("identical_output_codes", "q INT4 weights"): False,
        ("size_ratio_int4_to_int8", "q INT4 weights"): False,
        ("latency_ratio_to_tfmot_int8 (1 thread)", "q INT4 weights"): True,
        ("latency_ratio_to_tfmot_int8 (2 threads)", "q INT4 weights"): None,
    }


def test_tfmot_process_skips_without_tfmot(monkeypatch, tmp_path):
    monkeypatch.setattr(benchmark_overhead, "missing_baseline_modules", lambda: ["tf_keras"])
    result = bench.run_tfmot_process(None, str(tmp_path), 1, 1, 8, 0)
    assert result["status"] == "skipped"
    assert "tf_keras" in result["reason"] and "pip install -e .[baseline]" in result["reason"]


def test_run_benchmark_rejects_float_and_zero_epochs(tmp_path):
    with pytest.raises(ValueError, match="'float' is always measured"):
        bench.run_benchmark(data="digits", methods=["float"], output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="float_epochs must be >= 1, got 0"):
        bench.run_benchmark(
            data="digits", float_epochs=0, methods=["lsq_w4a4"], output_dir=str(tmp_path)
        )


@pytest.mark.slow
def test_run_benchmark_tiny_end_to_end(tmp_path):
    output_dir = str(tmp_path / "out")
    lines = []
    result = bench.run_benchmark(
        data="digits",
        float_epochs=1,
        finetune_epochs=1,
        methods=["lsq_w4a4"],
        output_dir=output_dir,
        tfmot=False,
        runs=3,
        warmup=1,
        threads=(1,),
        batch_size=32,
        train_samples=128,
        test_samples=64,
        calibration_samples=32,
        progress=lines.append,
    )
    path = bench.write_result(result, output_dir)
    loaded = json.loads(open(path, encoding="utf-8").read())

    assert loaded["tfmot"]["status"] == "disabled"
    assert loaded["config"]["test_rows"] == 64 and loaded["config"]["methods"] == ["lsq_w4a4"]
    assert [row["kind"] for row in loaded["rows"]] == ["int4", "int8_weights", "float"]
    for row in loaded["rows"]:
        assert os.path.isfile(row["tflite"]) and row["size_kib"] > 0
        # Accuracies can differ by no more than the share of samples whose top-1 differs.
        gap = abs(row["keras_accuracy"] - row["tflite_accuracy"])
        assert gap <= 1.0 - row["top1_agreement"] + 1e-9, row
        timing = row["latency"]["1"]
        assert timing["median_us"] > 0 and timing["ratio_to_float"] > 0
        assert timing["ratio_to_tfmot_int8"] is None
    int4, int8, _ = loaded["rows"]
    # Both quantized files are exact on this host, as the exporter promises.
    for row in (int4, int8):
        assert row["top1_agreement"] == 1.0 and row["identical_output_codes"] >= 0.999, row
    assert int4["max_output_step_difference"] >= 0
    assert int4["int8_weights_size_kib"] == int8["size_kib"]
    assert 0.0 < int4["size_ratio"] < 1.0  # INT4 storage is smaller than INT8
    exports = loaded["methods"]["lsq_w4a4"]["exports"]
    assert "INT4" in exports["int4"]["weights"]  # first and last layer stay 8-bit
    assert exports["int8_weights"]["weights"] == ["INT8"]
    assert {c["target"] for c in loaded["targets"]} >= {
        "top1_agreement",
        "identical_output_codes",
        "size_ratio_int4_to_int8",
    }
    table = bench.format_table(loaded)
    assert "lsq_w4a4 INT4 weights" in table and bench.FLOAT_ROW in table
    assert any("seed 0" in line for line in lines)
