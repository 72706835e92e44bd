"""benchmarks.results and benchmarks.plots: config checks, flags, the markdown page, plots,
and a tiny end-to-end run."""

import json
import os
import types

import pytest
from absl import app, flags

from benchmarks import overhead as benchmark_overhead
from benchmarks import plots
from benchmarks import results as bench


def _row(name, kind, method, bits, status="ok", **values):
    row = {
        "name": name,
        "kind": kind,
        "method": method,
        "weight_bits": bits if kind != "tfmot_nbit" else 4,
        "activation_bits": bits,
        "status": status,
        "command": "python -m benchmarks.results --quick",
        "seed": 0,
    }
    row.update(values)
    return row


def _ok(name, kind, method, bits, accuracy, size, latency=None, ratio=1.2, **values):
    return _row(
        name,
        kind,
        method,
        bits,
        keras_accuracy=accuracy,
        tflite_accuracy=accuracy - 0.001,
        top1_agreement=0.998,
        identical_output_codes=0.9,
        size_kib=size,
        step_time_ratio=ratio,
        latency=latency or {"1": {"median_us": 200.0}, "2": {"median_us": 130.0}},
        tflite=f"{name}.tflite",
        **values,
    )


def _result():
    rows = [
        _ok("float", "float", "float", 32, 0.98, 97.0, ratio=1.0),
        _ok("qil_w8a8", "tfquant", "qil", 8, 0.975, 30.0),
        _ok("qil_w4a4", "tfquant", "qil", 4, 0.97, 22.4),
        _row("qil_w2a2", "tfquant", "qil", 2, status="error", error="ExportError in export: bad"),
        _ok("lsq_w4a4", "tfquant", "lsq", 4, 0.96, 22.4, latency={"1": {"median_us": 180.5}}),
        _ok("qn_w4a4", "tfquant", "qn", 4, 0.95, 22.4, accuracy_before_bn_reestimation=0.8),
        _ok("tfmot_w8a8", "tfmot_int8", "tfmot", 8, 0.97, 30.5, ratio=None),
        _row(
            "tfmot_w4a8",
            "tfmot_nbit",
            "tfmot",
            8,
            status="skipped",
            error="tf_keras not installed",
        ),
    ]
    history = [
        {
            "epoch": epoch,
            "step": 10 * epoch,
            "values": {
                "block1_conv/qil_quantizer/center": 0.1 + 0.01 * epoch,
                "block1_conv/qil_quantizer/distance": 0.2 - 0.01 * epoch,
                "block1_relu/qil_quantizer_1/center": 0.5,
            },
        }
        for epoch in (0, 0.5, 1)
    ]
    return {
        "config": {
            "dataset": "mnist10k.npz",
            "train_rows": 300,
            "test_rows": 100,
            "methods": ["qil", "lsq"],
            "bits": [8, 4, 2],
            "float_epochs": 1,
            "finetune_epochs": 1,
            "float_learning_rate": 1e-3,
            "finetune_learning_rate": 5e-4,
            "batch_size": 64,
            "calibration_samples": 512,
            "bn_reestimation_rows": 256,
            "seed": 0,
            "runs": 5,
            "threads": [1, 2],
            "step_timing": "train_on_batch",
            "command": "python -m benchmarks.results --quick",
            "date": "2026-01-01 00:00 UTC",
            "machine": "x86_64, 2 CPUs",
            "tensorflow": "2.21.0",
            "keras": "3",
            "python": "3.11",
        },
        "rows": rows,
        "parameter_history": {"qil_w4a4": history},
        "tfmot": {"status": "skipped"},
        "runtime_seconds": 90.0,
    }


# ---------------------------------------------------------------------------
# Configuration and flags


def test_check_config_normalizes_values():
    methods, bits, threads = bench.check_config([" QIL", "lsq", ""], ["8", 4], 1, 1, 1, ["1", 2])
    assert methods == ["qil", "lsq"] and bits == [8, 4] and threads == [1, 2]


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"methods": ["qil", "nosuch"]}, "unknown method 'nosuch'"),
        ({"methods": ["qil_w4a4"]}, "unknown method 'qil_w4a4'"),
        ({"methods": []}, "--methods is empty"),
        ({"bits": [4, 9]}, "--bits value 9 is outside 2..8"),
        ({"bits": [1]}, "--bits value 1 is outside 2..8"),
        ({"bits": ["four"]}, "--bits value 'four' is not an integer"),
        ({"float_epochs": 0}, "--float_epochs must be >= 1, got 0"),
        ({"finetune_epochs": -1}, "--finetune_epochs must be >= 1, got -1"),
        ({"runs": 0}, "--runs must be >= 1, got 0"),
        ({"threads": [0]}, "--threads value 0 is below 1"),
    ],
)
def test_check_config_names_the_bad_value(arguments, message):
    settings = {"methods": ["qil"], "bits": [4]}
    settings.update(arguments)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        bench.check_config(**settings)


def _flags(*argv):
    flag_values = flags.FlagValues()
    bench.define_flags(flag_values)
    flag_values(["benchmark_results", *argv])
    return flag_values


def test_settings_from_flags_quick_budget_and_overrides():
    settings = bench.settings_from_flags(_flags("--quick", "--bits=3", "--runs=7"))
    assert settings["methods"] == ["qil", "lsq"] and settings["bits"] == [3]
    assert settings["float_epochs"] == 2 and settings["runs"] == 7
    assert settings["train_samples"] == 2000 and settings["tfmot"] is False
    full = bench.settings_from_flags(_flags())
    assert full["methods"] == list(bench.DEFAULT_METHODS) and full["bits"] == [8, 4, 3, 2]
    assert full["tfmot"] is True and full["train_samples"] is None
    assert full["threads"] == [1, 2]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods=qil,foo"], "unknown method 'foo'"),
        (["--bits=4,12"], "--bits value 12 is outside 2..8"),
        (["--float_epochs=0"], "--float_epochs must be >= 1, got 0"),
        (["--quick", "--finetune_epochs=0"], "--finetune_epochs must be >= 1, got 0"),
        (["--train_samples=0"], "--train_samples must be >= 1, got 0"),
    ],
)
def test_settings_from_flags_rejects_bad_values(argv, message):
    with pytest.raises(app.UsageError, match=message):
        bench.settings_from_flags(_flags(*argv))


def test_run_benchmark_checks_before_any_work(tmp_path):
    output_dir = tmp_path / "never"
    with pytest.raises(ValueError, match="--bits value 1 is outside 2..8"):
        bench.run_benchmark(data="digits", bits=[1], output_dir=str(output_dir))
    assert not output_dir.exists()


def test_tfmot_baselines_skip_without_tfmot(monkeypatch, tmp_path):
    monkeypatch.setattr(benchmark_overhead, "missing_baseline_modules", lambda: ["tf_keras"])
    reports = bench.run_tfmot_baselines(None, str(tmp_path), 1, 1, 8, 0, progress=print)
    assert [r["status"] for r in reports] == ["skipped", "skipped"]
    assert [(r["weight_bits"], r["activation_bits"]) for r in reports] == [(8, 8), (4, 8)]
    assert "pip install -e .[baseline]" in reports[0]["reason"]
    assert "--model=small_cnn" in reports[1]["baseline_command"]
    assert "--weight_bits=4" in reports[1]["baseline_command"]
    row = bench._tfmot_row(reports[1])
    assert row["status"] == "skipped" and "tf_keras" in row["error"]


def test_a_failing_scheme_becomes_an_error_row(monkeypatch, tmp_path):

    import numpy as np

    import tfquant

    def fail(*args, **kwargs):
        raise ValueError("no such layer")

    monkeypatch.setattr(tfquant, "quantize_model", fail)
    dataset = types.SimpleNamespace(x_train=np.zeros((4, 8, 8, 1), np.float32))
    row, history = bench._quantized_row("qil", 3, dataset, None, None, str(tmp_path), 1, 2, 4)
    assert row["name"] == "qil_w3a3" and row["status"] == "error" and history is None
    assert row["error"] == "ValueError in quantize_model: no such layer"


@pytest.mark.parametrize("status,code", [("error", 1), ("skipped", None)])
def test_a_failed_row_fails_the_run_after_the_page_is_written(monkeypatch, tmp_path, status, code):
    """Before, a run whose rows had failed still exited 0."""
    result = _result()
    result["rows"] = [r for r in result["rows"] if r["status"] == "ok"]
    result["rows"].append(_row("qil_w2a2", "tfquant", "qil", 2, status=status, error="bad"))
    monkeypatch.setattr(bench, "run_benchmark", lambda **settings: result)
    monkeypatch.setattr(bench, "settings_from_flags", lambda flag_values: {})
    written = []
    monkeypatch.setattr(
        bench, "write_outputs", lambda *args: written.append(args) or {"md": "RESULTS.md"}
    )
    monkeypatch.setattr(bench, "format_table", lambda result: "table")
    flag_values = types.SimpleNamespace(output_dir=str(tmp_path), results_md="R.md", image_dir="i")
    monkeypatch.setattr(bench.flags, "FLAGS", flag_values)
    if code is None:
        bench.main(["results"])
    else:
        with pytest.raises(SystemExit) as raised:
            bench.main(["results"])
        assert raised.value.code == code
    assert written  # the page first


# ---------------------------------------------------------------------------
# Table and markdown


def test_format_table_rows_errors_and_skips():
    table = bench.format_table(_result())
    lines = table.splitlines()
    assert lines[0].startswith("| method | W/A bits | Keras acc | TFLite acc | agreement")
    assert "latency 1T us" in lines[0] and "latency 2T us" in lines[0]
    assert "step time vs float" in lines[0]
    assert len(lines) == 2 + 8
    assert (
        "| float | float | 98.00% | 97.90% | 99.80% | 90.00% | 97.0 | 200.0 | 130.0 | 1.00x"
        in (lines[2])
    )
    assert "| qil | W4A4 | 97.00% | 96.90% |" in lines[4]
    assert "| qil | W2A2 | - | - | - | - | - | - | - | - | error: ExportError" in lines[5]
    assert "| 180.5 | - | 1.20x |" in lines[6]
    assert "| qn | W4A4 | 95.00% |" in lines[7]
    assert "| tfmot | W8A8 |" in lines[8] and "| - |" in lines[8]
    assert "skipped: tf_keras not installed" in lines[9]


def test_format_markdown_has_table_command_plots_and_paper_figures(tmp_path):
    result = _result()
    markdown_path = str(tmp_path / "docs" / "RESULTS.md")
    images = {"Accuracy vs bits": str(tmp_path / "docs" / "img" / "a.png")}
    page = bench.format_markdown(result, images, markdown_path)
    assert page.startswith("# Results")
    assert bench.format_table(result) in page
    assert "- Command: `python -m benchmarks.results --quick`" in page
    assert "- Seed: 0" in page and "- Date: 2026-01-01 00:00 UTC" in page
    assert "- Machine: x86_64, 2 CPUs" in page
    assert "float 1 epochs" in page and "momentum 0.99" in page and "total 1.5 min" in page
    assert "![Accuracy vs bits](img/a.png)" in page
    assert "statistics re-estimated after fine-tuning on 256 training rows" in page
    # only the row whose accuracy moved by a point or more is listed
    assert "where it differs by a point or more: qn_w4a4 80.00%" in page
    assert "- qil_w2a2: error: ExportError in export: bad" in page
    assert "## Paper figures we scale down from" in page
    # The paper table: published figures beside ours, "-" where we have no row.
    qil = next(line for line in page.splitlines() if line.startswith("| qil | Jung"))
    cells = [cell.strip() for cell in qil.strip("|").split("|")]
    assert cells[3:7] == ["70.2", "70.1", "69.2", "65.7"]
    assert cells[7:11] == ["98.00", "97.00", "-", "-"]
    assert "qil_resnet18_imagenet_w4a4.cfg" in cells[11]
    assert "What differs:" in page


# ---------------------------------------------------------------------------
# Plots


def _assert_png(path):
    assert os.path.isfile(path) and os.path.getsize(path) > 1000
    with open(path, "rb") as stream:
        assert stream.read(8) == b"\x89PNG\r\n\x1a\n"


def test_write_plots_from_a_synthetic_result(tmp_path):
    paths = plots.write_plots(_result(), str(tmp_path / "img"))
    assert len(paths) == 3
    assert "Learned parameters during fine-tuning: qil_w4a4" in paths
    for path in paths.values():
        _assert_png(path)


def test_plots_with_no_successful_rows_and_history_from_json(tmp_path):
    result = _result()
    result["rows"] = [row for row in result["rows"] if row["status"] != "ok"]
    _assert_png(plots.plot_accuracy_vs_bits(result, str(tmp_path / "accuracy.png")))
    _assert_png(plots.plot_size_vs_accuracy(result, str(tmp_path / "size.png")))
    history_path = tmp_path / "parameters.json"
    history_path.write_text(json.dumps(_result()["parameter_history"]["qil_w4a4"]))
    _assert_png(plots.plot_parameter_history(str(history_path), str(tmp_path / "history.png")))
    _assert_png(plots.plot_parameter_history([], str(tmp_path / "empty.png")))


# ---------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_run_benchmark_tiny_end_to_end(tmp_path):
    output_dir = str(tmp_path / "out")
    markdown_path = str(tmp_path / "docs" / "RESULTS.md")
    lines = []
    result = bench.run_benchmark(
        data="npz:../shared/data/mnist10k.npz"
        if os.path.exists("../shared/data/mnist10k.npz")
        else "digits",
        methods=["lsq"],
        bits=[4],
        float_epochs=1,
        finetune_epochs=1,
        runs=5,
        warmup=1,
        threads=(1,),
        output_dir=output_dir,
        tfmot=False,
        train_samples=300,
        test_samples=100,
        calibration_samples=64,
        command="python -m benchmarks.results --test",
        progress=lines.append,
    )
    paths = bench.write_outputs(result, output_dir, markdown_path, str(tmp_path / "docs" / "img"))
    loaded = json.loads(open(paths["json"], encoding="utf-8").read())

    assert any(line.startswith("== lsq_w4a4: Keras") for line in lines), lines
    assert loaded["config"]["test_rows"] == 100 and loaded["config"]["methods"] == ["lsq"]
    assert loaded["tfmot"]["status"] == "disabled"
    assert [row["name"] for row in loaded["rows"]] == ["float", "lsq_w4a4"]
    row = loaded["rows"][1]
    assert row["status"] == "ok", row.get("error")
    assert row["command"] == "python -m benchmarks.results --test" and row["seed"] == 0
    # The exporter's promise: the file computes the Keras model's codes.
    assert row["top1_agreement"] == 1.0 and row["identical_output_codes"] >= 0.999, row
    assert row["keras_accuracy"] == row["tflite_accuracy"]
    assert os.path.isfile(row["tflite"]) and row["size_kib"] > 0
    assert row["latency"]["1"]["median_us"] > 0 and row["step_time_ratio"] > 0
    assert "INT4" in row["weight_storage"]
    assert row["accuracy_before_bn_reestimation"] <= 1.0 and row["bn_std_ratio"] >= 1.0
    assert loaded["config"]["bn_reestimation_rows"] == 300
    history = loaded["parameter_history"]["lsq_w4a4"]
    assert history[0]["epoch"] == 0.0 and history[-1]["epoch"] == 1.0
    assert any(key.endswith("step") for key in history[-1]["values"])
    page = open(markdown_path, encoding="utf-8").read()
    assert "| lsq | W4A4 |" in page and "| float | float |" in page
    images = [path for path in paths.values() if path.endswith(".png")]
    assert len(images) == 3
    for path in images:
        _assert_png(path)


# ---------------------------------------------------------------------------
# Row schemes


def test_qn_rows_use_the_paper_level_sets():
    scheme, note = bench.bench_scheme("qn", 4)
    assert scheme.weights == {"class_name": "qn", "config": {"levels": "3(+-4)"}}
    assert (scheme.weight_bits, scheme.activation_bits, scheme.activations) == (4, 4, "qn")
    assert note == "weights 3(+-4)"
    assert bench.bench_scheme("qn", 3)[1] == "weights 3(+-2)"
    assert bench.bench_scheme("qn", 2)[1] == "weights ternary"
    assert bench.bench_scheme("lsq", 3) == ("lsq_w3a3", "")
    assert bench.bench_scheme("qn", 8) == ("qn_w8a8", "")


def test_qn_temperature_climbs_over_the_whole_budget():
    scheduler = bench.qn_temperature(rows=8000, batch_size=64, epochs=2)
    assert scheduler.per == "step"
    assert scheduler.temperature_at(0) == 1.0
    assert scheduler.temperature_at(249) == pytest.approx(bench.QN_FINAL_TEMPERATURE)
    assert scheduler.temperature_at(10_000) == bench.QN_FINAL_TEMPERATURE
