"""benchmarks.overhead: timing, summary, JSON, the tfmot skip, and a tiny run."""

import importlib.util
import json
import re
import warnings

import keras
import numpy as np
import pytest

from benchmarks import overhead as bench
from train import models


class _Loss:
    def __init__(self, value):
        self.value = value

    def numpy(self):
        return np.float32(self.value)


def test_time_interleaved_rotates_order_and_counts_steps():
    calls = []

    def step(name):
        def run():
            calls.append(name)
            return _Loss(1.0)

        return run

    lines = []
    times = bench.time_interleaved(
        {"a": step("a"), "b": step("b"), "c": step("c")},
        rounds=3,
        steps=2,
        warmup_steps=1,
        progress=lines.append,
    )
    assert sorted(times) == ["cpu_ms", "wall_ms"]
    for kind in times.values():
        assert sorted(kind) == ["a", "b", "c"]
        assert all(len(v) == 3 and all(t >= 0 for t in v) for v in kind.values())
    # warm-up a, b, c; then per round 1 untimed + 2 timed steps per variant
    rounds = calls[3:]
    assert len(rounds) == 3 * 3 * 3
    firsts = [rounds[9 * r + 3 * k] for r in range(3) for k in range(3)]
    assert firsts == list("abcbcacab")
    assert len(lines) == 3 + 3


def test_time_interleaved_rejects_zero_rounds():
    with pytest.raises(ValueError, match="got 0, 1, 1"):
        bench.time_interleaved({"a": lambda: _Loss(0)}, rounds=0, steps=1, warmup_steps=1)


def test_summarize_medians_and_ratios():
    wall = {"float": [100.0, 300.0, 200.0], "q": [120.0, 330.0, 260.0]}
    cpu = {"float": [10.0, 20.0, 30.0], "q": [15.0, 40.0, 30.0]}
    summary = bench.summarize({"wall_ms": wall, "cpu_ms": cpu}, "float")
    assert summary["float"]["median_step_ms"] == 200.0
    assert summary["float"]["ratio_to_float"] == 1.0
    assert summary["q"]["median_step_ms"] == 260.0
    assert summary["q"]["ratio_to_float"] == pytest.approx(1.3)
    # per-round ratios 1.2, 1.1, 1.3
    assert summary["q"]["paired_ratio"] == pytest.approx(1.2)
    assert (summary["q"]["min_step_ms"], summary["q"]["max_step_ms"]) == (120.0, 330.0)
    assert summary["q"]["cpu_median_step_ms"] == 30.0
    assert summary["q"]["cpu_ratio_to_float"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="baseline 'float32' was not timed"):
        bench.summarize({"wall_ms": wall, "cpu_ms": cpu}, "float32")


@pytest.mark.parametrize("methods", [["qil_w44"], ["float"], ["lsq_w4a4", "lsq_w4a4"]])
def test_check_methods_rejects(methods):
    with pytest.raises(ValueError):
        bench.check_methods(methods)


def test_check_methods_accepts_any_scheme_name():
    assert bench.check_methods(["pact_w4a4", " lsq_w2a2", ""]) == ["pact_w4a4", "lsq_w2a2"]


def test_write_json_atomically_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    bench.write_json_atomically({"a": [1, 2]}, str(path))
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_tfmot_row_skipped_with_install_hint_when_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        bench.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorflow_model_optimization" else real(name, *a),
    )
    result = bench.run_tfmot_process(steps=1, rounds=1, batch_size=2, warmup_steps=1, seed=0)
    assert result["status"] == "skipped"
    assert "tensorflow_model_optimization" in result["reason"]
    assert "pip install -e .[baseline]" in result["reason"]


@pytest.mark.skipif(importlib.util.find_spec("tf_keras") is None, reason="needs tf_keras")
def test_tf_keras_resnet20_mirrors_keras3_builder():
    import tf_keras

    from benchmarks import tfmot_steps as tfmot_step_timer

    ours = models.resnet20(bench.INPUT_SHAPE, bench.NUM_CLASSES)
    theirs = tfmot_step_timer.resnet20(tf_keras)

    def describe(model):
        return [(layer.name, type(layer).__name__, layer.count_params()) for layer in model.layers]

    assert describe(theirs) == describe(ours)
    assert theirs.count_params() == ours.count_params() == 274042


@pytest.mark.slow
def test_run_benchmark_tiny_structure(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bench.run_benchmark(
            methods=["lsq_w4a4"],
            steps=1,
            rounds=2,
            batch_size=2,
            warmup_steps=1,
            tfmot=False,
            calibrate=False,
        )
    path = tmp_path / "result.json"
    bench.write_json_atomically(result, str(path))
    loaded = json.loads(path.read_text())
    assert loaded["tfmot"]["status"] == "disabled"
    assert loaded["config"]["methods"] == ["lsq_w4a4"]
    assert [row["variant"] for row in loaded["rows"]] == ["float", "lsq_w4a4"]
    for row in loaded["rows"]:
        assert isinstance(row["median_step_ms"], float) and row["median_step_ms"] > 0
        assert isinstance(row["ratio_to_float"], float) and row["ratio_to_float"] > 0
        assert isinstance(row["cpu_ratio_to_float"], float) and row["cpu_ratio_to_float"] > 0
        assert len(row["round_step_ms"]) == 2
    assert loaded["rows"][0]["ratio_to_float"] == 1.0
    assert loaded["rows"][1]["layers"] > loaded["rows"][0]["layers"]
    table = bench.format_table(loaded["rows"])
    assert "lsq_w4a4" in table and "1.00x" in table
    keras.backend.clear_session()


def test_targets_per_method():
    assert bench.target_of("float") is None
    assert bench.target_of("lsq_w4a4") == bench.TARGET_RATIO == 1.25
    assert bench.target_of("dq_w4a4") == 1.25
    assert bench.target_of("qn_w3a3") == 1.4
    assert bench.target_of("cpq_w4a4") == 2.0


@pytest.mark.slow
def test_qn_temperature_is_set_on_every_qn_quantizer_and_checked(capsys):
    with pytest.raises(ValueError, match="qn_temperature must be > 0, got 0"):
        bench.run_benchmark(methods=["qn_w3a3"], tfmot=False, qn_temperature=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times, _ = bench.time_keras3_variants(
            ["qn_w3a3"], steps=1, rounds=1, batch_size=2, warmup_steps=1, seed=0,
            calibrate=False, qn_temperature=41.0,
        )  # fmt: skip
    assert set(times["wall_ms"]) == {"float", "qn_w3a3"}
    found = re.search(
        r"(\d+) QN quantizers of qn_w3a3 at temperature 41\b", capsys.readouterr().out
    )
    # ResNet-20's kernels and the activation quantizers in front of its layers
    assert found and int(found.group(1)) >= 30
    keras.backend.clear_session()
