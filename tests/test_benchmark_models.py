"""`make models`: the keras.applications matrix (benchmarks/models.py)."""

import json

import pytest

from benchmarks import models


def test_unknown_family_is_named():
    with pytest.raises(SystemExit):
        models.parse_arguments(["--families=MobileNet,ResNet9"])


def test_table_shows_figures_and_errors():
    args = models.parse_arguments([])
    agreement = {"top1_agreement": 1.0, "identical_output_codes": 0.999, "samples": 32}
    rows = [
        {"family": "NoSuchNet", "input": "64x64x3", "error": "cannot quantize layer 'x'"},
        {
            "family": "MobileNet",
            "input": "64x64x3",
            "float_accuracy": 0.9,
            "float_kib": 800.0,
            "ptq_kib": 300.0,
            "ptq_accuracy": 0.89,
            "schemes": {
                "lsq_w8a8": {
                    "kib": 290.0,
                    "tflite_accuracy": 0.88,
                    "targets": {"x86": {**agreement, "max_output_step_difference": 1}},
                },
                "lsq_w4a4": {"error": "ExportError: boom"},
            },
            "latency_ratio": {1: [0.98, 1.02], 2: [1.0, 1.0]},
            "tfmot": {"status": "refused", "reason": "ValueError: ReLU6"},
        },
    ]
    text = models.format_markdown(rows, args, 60.0)
    assert "not quantized: cannot quantize layer 'x'" in text
    assert "x86: 100.00% / 99.90% (max 1)" in text
    assert "error: ExportError: boom" in text
    assert "| 0.98-1.02 | 1.00 |" in text
    assert "refused: ValueError: ReLU6" in text


@pytest.mark.slow
def test_run_writes_the_table_and_fails_on_a_family_that_fails(tmp_path, monkeypatch):
    # A family keras.applications does not have: its row records the error.
    monkeypatch.setattr(models, "FAMILIES", (*models.FAMILIES, ("NoSuchNet", 32, {})))
    output, json_output = tmp_path / "MODELS.md", tmp_path / "models.json"
    status = models.main(
        [
            "--families=MobileNet,NoSuchNet",
            "--data=digits",
            "--train_samples=64",
            "--test_samples=32",
            "--verify_samples=8",
            "--latency_runs=3",
            "--latency_repeats=1",
            "--noarm64",
            f"--output={output}",
            f"--json_output={json_output}",
        ]
    )
    assert status == 1
    rows = {row["family"]: row for row in json.loads(json_output.read_text())}
    assert "NoSuchNet" in rows["NoSuchNet"]["error"]
    exported = rows["MobileNet"]["schemes"]["lsq_w8a8"]["targets"]
    assert exported["x86"]["identical_output_codes"] == 1.0
    assert "NoSuchNet" in output.read_text()


def test_update_keeps_the_other_families_rows(tmp_path):
    path = tmp_path / "models.json"
    old = [
        {"family": "MobileNet", "input": "64x64x3", "error": "old", "seconds": 60.0},
        {"family": "ResNet50V2", "input": "64x64x3", "latency_ratio": {1: [1.0]}, "seconds": 120.0},
    ]
    path.write_text(json.dumps(old))
    previous = models.previous_rows(str(path))
    assert previous[1]["latency_ratio"] == {1: [1.0]}  # int keys again after JSON
    new = [{"family": "MobileNet", "input": "64x64x3", "error": "new", "seconds": 30.0}]
    merged = models.merged_rows(previous, new)
    assert [(r["family"], r.get("error")) for r in merged] == [
        ("MobileNet", "new"),
        ("ResNet50V2", None),
    ]
    path.write_text("{not json")
    with pytest.raises(SystemExit, match="models.json"):
        models.previous_rows(str(path))
