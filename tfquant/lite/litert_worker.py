"""Runs a .tflite file on prepared inputs, one runtime after another.

A standalone script: it imports only NumPy and `ai_edge_litert`, so that it
runs in a Python that has nothing else, such as the emulated aarch64 Python of
`tfquant.lite.arm64`. The host prepares everything (int8 codes for an int8
input), so the script does no arithmetic of its own:

    python litert_worker.py REQUEST.npz RESULT.npz

REQUEST.npz holds `model` (the file's bytes as uint8), `inputs` (the array to
feed, batch first), `runtimes` (names from `RUNTIMES`), `batch_size` and
`num_threads`. RESULT.npz gets one output array per runtime, under its name,
and `machine` and `litert_version`.
"""

from __future__ import annotations

import platform
import sys

import numpy as np

# How each runtime name maps to LiteRT's op resolver.
RUNTIMES = {
    "default": "AUTO",  # builtin kernels with the default XNNPACK delegate
    "builtin": "BUILTIN_WITHOUT_DEFAULT_DELEGATES",  # optimized builtin kernels only
    "reference": "BUILTIN_REF",  # reference kernels
}


def run_model(
    content: bytes, inputs: np.ndarray, runtime: str, batch_size: int = 256, num_threads: int = 2
) -> np.ndarray:
    """The model's first output for `inputs` (fed as they are), batch by batch."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {sorted(RUNTIMES)}, got {runtime!r}")
    interp = Interpreter(
        model_content=content,
        num_threads=num_threads,
        experimental_op_resolver_type=getattr(OpResolverType, RUNTIMES[runtime]),
    )
    index = interp.get_input_details()[0]["index"]
    outputs = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        interp.resize_tensor_input(index, batch.shape)
        interp.allocate_tensors()
        interp.set_tensor(index, batch)
        interp.invoke()
        outputs.append(interp.get_tensor(interp.get_output_details()[0]["index"]).copy())
    return np.concatenate(outputs)


def litert_version() -> str:
    try:
        from importlib import metadata

        return metadata.version("ai-edge-litert")
    except Exception:  # noqa: BLE001 - a wheel unpacked without metadata
        return "unknown"


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: litert_worker.py REQUEST.npz RESULT.npz", file=sys.stderr)
        return 2
    request = np.load(argv[1], allow_pickle=False)
    content = request["model"].tobytes()
    results = {}
    for runtime in [str(r) for r in request["runtimes"]]:
        results[runtime] = run_model(
            content,
            request["inputs"],
            runtime,
            int(request["batch_size"]),
            int(request["num_threads"]),
        )
    with open(argv[2], "wb") as stream:
        np.savez(stream, machine=platform.machine(), litert_version=litert_version(), **results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
