"""benchmarks.recipes with a fake process runner (no training)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from benchmarks import recipes as run_recipes


def _fake_runner(calls, fail=()):
    def run(command, **kwargs):
        calls.append(command)
        model_dir = next(a.split("=", 1)[1] for a in command if a.startswith("--model_dir="))
        name = os.path.basename(model_dir)
        if name in fail:
            return subprocess.CompletedProcess(command, 1, "", "Traceback\nValueError: boom")
        os.makedirs(model_dir, exist_ok=True)
        history = [
            {"epoch": 0, "val_accuracy": 0.5, "accuracy": 0.4, "seconds": 1.0},
            {"epoch": 1, "val_accuracy": 0.9, "accuracy": 0.8, "seconds": 2.0},
        ]
        if name.startswith("cpq"):
            history[-1].update(average_weight_bits=4.25, learned_weight_bits={"conv": 4})
        with open(os.path.join(model_dir, "metrics.json"), "w") as stream:
            json.dump(history, stream)
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def test_float_first_then_each_recipe_from_its_final_model(tmp_path):
    calls = []
    rows = run_recipes.run_all(
        ["lsq_small_cnn_w4a4", "cpq_small_cnn_w4a4_learned_bits"],
        "npz:data.npz",
        40,
        str(tmp_path),
        runner=_fake_runner(calls),
    )
    assert [r["recipe"] for r in rows] == [
        "float_small_cnn",
        "lsq_small_cnn_w4a4",
        "cpq_small_cnn_w4a4_learned_bits",
    ]
    assert not any(a.startswith("--init_from") for a in calls[0])
    init = f"--init_from={tmp_path / 'float_small_cnn' / 'final.keras'}"
    assert all(init in command for command in calls[1:])
    for command in calls:
        assert "--dataset=npz:data.npz" in command and "--steps_per_epoch=40" in command
    lsq = rows[1]
    assert (lsq["method"], lsq["bits"], lsq["status"]) == ("lsq", "W4A4", "ok")
    assert (lsq["val_accuracy"], lsq["epochs"]) == (0.9, 2)
    assert rows[0]["bits"] == "float" and rows[2]["average_weight_bits"] == 4.25
    page = run_recipes.format_markdown(rows, "npz:data.npz", 40)
    assert "| lsq_small_cnn_w4a4 | lsq | W4A4 | 90.00% | 2 |" in page
    assert "average weight bits 4.25" in page
    assert "train/recipes/lsq_small_cnn_w4a4.cfg" in page


def test_a_failing_recipe_is_a_row_and_the_run_goes_on(tmp_path):
    calls = []
    rows = run_recipes.run_all(
        ["qil_small_cnn_w4a4", "pact_small_cnn_w4a4"],
        "digits",
        5,
        str(tmp_path),
        runner=_fake_runner(calls, fail={"qil_small_cnn_w4a4"}),
    )
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert "ValueError: boom" in rows[1]["error"]
    assert "error: ValueError: boom" in run_recipes.format_markdown(rows, "digits", 5)


def test_a_failing_float_recipe_stops_the_others(tmp_path):
    calls = []
    rows = run_recipes.run_all(
        ["qil_small_cnn_w4a4"],
        "digits",
        5,
        str(tmp_path),
        runner=_fake_runner(calls, fail={"float_small_cnn"}),
    )
    assert len(calls) == 1
    assert rows[1] == {
        "recipe": "qil_small_cnn_w4a4",
        "status": "error",
        "error": "the float recipe failed",
    }


def test_unknown_recipe_and_bad_steps_fail_before_any_work(tmp_path):
    calls = []
    with pytest.raises(ValueError, match="'nope'.*known recipes"):
        run_recipes.run_all(["nope"], "digits", 5, str(tmp_path), runner=_fake_runner(calls))
    with pytest.raises(ValueError, match="steps_per_epoch must be >= 0, got -1"):
        run_recipes.run_all(
            ["qil_small_cnn_w4a4"], "digits", -1, str(tmp_path), runner=_fake_runner(calls)
        )
    assert calls == [] and not os.listdir(tmp_path)


def test_default_recipes_exist():
    for name in (run_recipes.FLOAT_RECIPE, *run_recipes.DEFAULT_RECIPES):
        assert os.path.isfile(run_recipes.recipe_path(name))
