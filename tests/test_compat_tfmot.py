"""tfquant.compat.tfmot: lazy import, and QIL/LSQ/CPQ through tensorflow-model-optimization.

tensorflow-model-optimization needs legacy Keras, so everything that uses it
runs in a child process started with TF_USE_LEGACY_KERAS=1
(`python -m tfquant.compat._tfmot_check qil lsq cpq`); this process only
reads its JSON result.
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
METHODS = ("qil", "lsq", "cpq")
TIMEOUT_SECONDS = 300
HAVE_BASELINE = all(
    importlib.util.find_spec(name) is not None
    for name in ("tf_keras", "tensorflow_model_optimization")
)
needs_baseline = pytest.mark.skipif(
    not HAVE_BASELINE, reason="needs tf_keras and tensorflow_model_optimization"
)

# The quantizer variables each method creates: conv (W4A4) and dense (W4).
EXPECTED_PARAMETERS = {
    "qil": {
        "quant_conv/kernel_interval",
        "quant_conv/output_interval",
        "quant_dense/kernel_interval",
    },
    "lsq": {"quant_conv/kernel_step", "quant_conv/output_step", "quant_dense/kernel_step"},
    "cpq": {
        "quant_conv/kernel_log_step",
        "quant_conv/kernel_log_sigma",
        "quant_conv/output_log_step",
        "quant_conv/output_log_sigma",
        "quant_dense/kernel_log_step",
        "quant_dense/kernel_log_sigma",
    },
}


def test_module_imports_without_loading_tfmot():
    loaded_before = "tensorflow_model_optimization" in sys.modules
    module = importlib.import_module("tfquant.compat.tfmot")
    if not loaded_before:
        assert "tensorflow_model_optimization" not in sys.modules
    assert "LearnedQuantizeConfig" in module.__all__
    assert module.INSTALL_HINT == "pip install tfquant[baseline]"
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        module.missing  # noqa: B018


def test_missing_tfmot_raises_import_error_with_install_hint(monkeypatch):
    module = importlib.import_module("tfquant.compat.tfmot")
    monkeypatch.setattr(module, "_CLASSES", {})
    monkeypatch.setitem(sys.modules, "tensorflow_model_optimization", None)
    with pytest.raises(ImportError, match=r"pip install tfquant\[baseline\]"):
        module.QILWeightQuantizer  # noqa: B018
    with pytest.raises(ImportError, match="TF_USE_LEGACY_KERAS=1"):
        module.learned_quantize_config("lsq")


def test_unknown_method_is_rejected_before_tfmot_is_needed(monkeypatch):
    module = importlib.import_module("tfquant.compat.tfmot")
    monkeypatch.setitem(sys.modules, "tensorflow_model_optimization", None)
    with pytest.raises(ValueError, match="'pact'"):
        module.learned_quantize_config("pact")


def _last_json_line(text: str):
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


@pytest.fixture(scope="module")
def tfmot_results():
    """Runs the end-to-end check for every method in one legacy-Keras process."""
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-m", "tfquant.compat._tfmot_check", *METHODS],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )
    result = _last_json_line(completed.stdout)
    assert result is not None, f"no JSON result\n{completed.stdout}\n{completed.stderr[-3000:]}"
    assert result["status"] == "ok", result.get("traceback", result)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return result


@needs_baseline
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_tfmot_quantizers_train_and_export_to_tflite(tfmot_results, method):
    result = tfmot_results["methods"][method]
    assert len(result["losses"]) == 3
    assert result["finite"], result["losses"]
    assert set(result["parameters"]) == EXPECTED_PARAMETERS[method]
    assert set(result["changed"]) == EXPECTED_PARAMETERS[method]
    assert result["tflite_bytes"] > 0
    assert result["tflite_output_shape"] == [1, 3]
    assert result["tflite_finite"]
    tolerance = 1e-2 * max(1.0, result["keras_output_scale"])
    assert result["tflite_max_abs_diff"] <= tolerance, result


@needs_baseline
@pytest.mark.slow
def test_out_of_range_bits_raise_value_error_naming_the_value(tfmot_results):
    messages = tfmot_results["bits_errors"]
    assert len(messages) == 6
    for name, method in (
        ("QILWeightQuantizer", "QIL"),
        ("LSQActivationQuantizer", "LSQ"),
        ("CPQWeightQuantizer", "CPQ"),
    ):
        for bits in (1, 9):
            assert f"{name}: bits must be in 2..8 for {method}, got {bits}" in messages
