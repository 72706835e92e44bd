"""Running a .tflite file on LiteRT's arm64 kernels, on any Linux host.

Android phones run LiteRT's aarch64 kernels, which do not round like the x86
ones (TFLite's optimized builtin kernels requantize differently per CPU; XNNPACK
does not). This module runs a file on those kernels without a phone: an aarch64
Python with the same `ai-edge-litert` release as the host, under QEMU's
user-mode emulation. The emulated CPU executes the arm64 instructions
themselves, so the integer results are the phone's; the time it takes says
nothing about a phone's speed (use `export/benchmark_android.sh` for that).

The environment is built once (`build_environment`, or `make arm64`) into a
folder, by default `.arm64/` beside the `tfquant` package (`TFQUANT_ARM64_DIR`
overrides it), and is used offline after that:

* `qemu-aarch64`: QEMU's statically linked aarch64 user-mode emulator, from Debian
  13's `qemu-user` package. Debian 12's QEMU 7.2 is not enough: LiteRT 2.2 and
  later crash under it, and LiteRT 2.1's SME kernels compute wrong results.
* `root/`: a minimal Debian 12 aarch64 file tree with Python 3.11
  (`debootstrap --foreign`, packages unpacked, no second stage).
* `site/`: aarch64 wheels of `ai-edge-litert` (the host's version) and NumPy,
  unpacked.

On an aarch64 host nothing is emulated: the host's own Python runs the file.

>>> from tfquant.lite import arm64                               # doctest: +SKIP
>>> arm64.build_environment()                                   # doctest: +SKIP
>>> outputs = arm64.run(content, codes, runtimes=("default",))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence

import numpy as np

# Debian suites: the target file tree (its Python matches the cp311 wheels)
# and the one whose QEMU runs current LiteRT correctly.
ROOT_SUITE = "bookworm"
QEMU_SUITE = "trixie"
PYTHON = "usr/bin/python3.11"
WHEEL_PLATFORMS = ("manylinux_2_17_aarch64", "manylinux_2_27_aarch64", "manylinux_2_28_aarch64")
# The emulated CPU: QEMU's "max" has every feature it implements (dot product,
# i8mm, SVE2, SME), so LiteRT takes the kernels of a current phone.
DEFAULT_CPU = "max"
_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "litert_worker.py")
_STAMP = "environment.json"


class Arm64Error(RuntimeError):
    """The arm64 environment is missing, cannot be built, or failed to run."""


def default_directory() -> str:
    """`TFQUANT_ARM64_DIR`, else `.arm64/` in the folder that holds `tfquant/`."""
    configured = os.environ.get("TFQUANT_ARM64_DIR")
    if configured:
        return os.path.abspath(configured)
    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(package, ".arm64")


def is_native() -> bool:
    """True on an aarch64 host: the host's own kernels are the arm64 ones."""
    return platform.machine().lower() in ("aarch64", "arm64")


def host_litert_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        raise Arm64Error(
            "ai-edge-litert is not installed on the host (pip install ai-edge-litert)"
        ) from None


def environment_info(directory: str | None = None) -> dict | None:
    """What a built environment holds (versions), or None if none is built there."""
    directory = directory or default_directory()
    try:
        with open(os.path.join(directory, _STAMP), encoding="utf-8") as stream:
            return json.load(stream)
    except (OSError, ValueError):
        return None


def check_environment(directory: str | None = None) -> dict:
    """The built environment's info; raises `Arm64Error` naming what is wrong."""
    if is_native():
        return {"machine": platform.machine(), "emulated": False}
    directory = directory or default_directory()
    info = environment_info(directory)
    if info is None:
        raise Arm64Error(
            f"no arm64 environment in {directory!r}: build it once with `make arm64` "
            "(or tfquant.lite.arm64.build_environment())"
        )
    wanted = host_litert_version()
    if info.get("litert_version") != wanted:
        raise Arm64Error(
            f"the arm64 environment in {directory!r} has ai-edge-litert "
            f"{info.get('litert_version')}, the host {wanted}: rebuild it with `make arm64`"
        )
    for path in (info["qemu"], os.path.join(directory, "root", PYTHON)):
        if not os.path.exists(os.path.join(directory, path)):
            raise Arm64Error(f"the arm64 environment in {directory!r} lacks {path}: rebuild it")
    return info


def _log(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _run(command: Sequence[str], what: str, cwd: str | None = None) -> str:
    try:
        completed = subprocess.run(
            list(command), cwd=cwd, capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise Arm64Error(f"{what}: {command[0]!r} is not installed") from None
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
        raise Arm64Error(f"{what} failed ({' '.join(command[:3])} ...):\n  " + "\n  ".join(tail))
    return completed.stdout


def debian_mirror() -> str:
    """The Debian archive the host's apt uses (not the security archive)."""
    output = _run(
        ["apt-get", "indextargets", "--format", "$(REPO_URI)"], "finding the Debian mirror"
    )
    mirrors = sorted({line.strip() for line in output.splitlines() if line.strip()})
    plain = [m for m in mirrors if "security" not in m]
    if not plain:
        raise Arm64Error(
            f"no Debian archive among apt's sources {mirrors}; the host must be Debian"
        )
    return plain[0]


def _ensure_host_tools(progress) -> None:
    missing = [tool for tool in ("debootstrap", "dpkg-deb") if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise Arm64Error(
            f"{', '.join(missing)} missing; install them (apt-get install debootstrap dpkg) "
            "or build as root"
        )
    _log(progress, "installing debootstrap with apt-get")
    _run(["apt-get", "install", "-y", "-q", "debootstrap"], "apt-get install debootstrap")


def _fetch_qemu(directory: str, mirror: str, progress) -> str:
    """Downloads Debian's qemu-user for QEMU_SUITE with apt and unpacks it."""
    apt = os.path.join(directory, "apt")
    for sub in ("lists/partial", "archives/partial", "etc/sources.list.d"):
        os.makedirs(os.path.join(apt, sub), exist_ok=True)
    sources = os.path.join(apt, "etc", "sources.list")
    with open(sources, "w", encoding="utf-8") as stream:
        stream.write(f"deb {mirror.rstrip('/')} {QEMU_SUITE} main\n")
    options = [
        "-q",
        "-o",
        f"Dir::Etc::SourceList={sources}",
        "-o",
        f"Dir::Etc::SourceParts={os.path.join(apt, 'etc', 'sources.list.d')}",
        "-o",
        f"Dir::State::Lists={os.path.join(apt, 'lists')}",
        "-o",
        f"Dir::Cache::Archives={os.path.join(apt, 'archives')}",
        "-o",
        "Debug::NoLocking=1",
    ]
    _log(progress, f"downloading qemu-user from Debian {QEMU_SUITE}")
    _run(["apt-get", *options, "update"], f"apt-get update for Debian {QEMU_SUITE}")
    _run(["apt-get", *options, "download", "qemu-user"], "apt-get download qemu-user", cwd=apt)
    debs = sorted(glob.glob(os.path.join(apt, "qemu-user_*.deb")))
    if not debs:
        raise Arm64Error("apt-get download qemu-user left no package")
    unpacked = os.path.join(apt, "unpacked")
    _run(["dpkg-deb", "-x", debs[-1], unpacked], "unpacking qemu-user")
    binary = os.path.join(unpacked, "usr", "bin", "qemu-aarch64")
    if not os.path.exists(binary):
        raise Arm64Error(f"{os.path.basename(debs[-1])} has no usr/bin/qemu-aarch64")
    # Keep the one (statically linked) emulator; the package has every architecture's.
    os.replace(binary, os.path.join(directory, "qemu-aarch64"))
    shutil.rmtree(apt)
    return "qemu-aarch64"


def _make_root(directory: str, mirror: str, progress) -> None:
    root = os.path.join(directory, "root")
    if os.path.exists(os.path.join(root, PYTHON)):
        return
    shutil.rmtree(root, ignore_errors=True)
    _log(progress, f"debootstrap: a minimal Debian {ROOT_SUITE} arm64 tree with Python")
    _run(
        [
            "debootstrap",
            "--arch=arm64",
            "--foreign",
            "--variant=minbase",
            "--include=python3",
            ROOT_SUITE,
            root,
            mirror,
        ],
        "debootstrap",
    )
    debs = sorted(glob.glob(os.path.join(root, "var", "cache", "apt", "archives", "*.deb")))
    _log(progress, f"unpacking {len(debs)} Debian packages")
    for deb in debs:
        _run(["dpkg-deb", "-x", deb, root], f"unpacking {os.path.basename(deb)}")
        os.remove(deb)
    if not os.path.exists(os.path.join(root, PYTHON)):
        raise Arm64Error(f"the arm64 tree has no {PYTHON} after debootstrap")


def _fetch_wheels(directory: str, version: str, progress) -> None:
    wheels = os.path.join(directory, "wheels")
    site = os.path.join(directory, "site")
    shutil.rmtree(wheels, ignore_errors=True)
    shutil.rmtree(site, ignore_errors=True)
    _log(progress, f"downloading aarch64 wheels of ai-edge-litert {version}")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"]
    command += ["--python-version", "3.11", "--implementation", "cp", "-d", wheels]
    for tag in (*WHEEL_PLATFORMS, "any"):
        command += ["--platform", tag]
    _run([*command, f"ai-edge-litert=={version}"], "pip download ai-edge-litert (aarch64)")
    for wheel in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    shutil.rmtree(wheels)


def _worker_in(scratch: str) -> str:
    """A copy of the worker script in `scratch`: run from its own folder, the
    script would see tfquant/lite's modules (`inspect`) before the standard library's."""
    path = os.path.join(scratch, os.path.basename(_WORKER))
    shutil.copyfile(_WORKER, path)
    return path


def _probe(directory: str, info: dict) -> dict:
    """Runs the worker's imports in the environment; returns machine and version."""
    code = (
        "import platform, sys; sys.path.insert(0, sys.argv[1]); "
        "import litert_worker as w, ai_edge_litert.interpreter; "
        "print(platform.machine(), w.litert_version())"
    )
    env = {**os.environ, "PYTHONPATH": os.path.join(directory, "site")}
    with tempfile.TemporaryDirectory(prefix="tfquant-arm64-") as scratch:
        _worker_in(scratch)
        command = _command(directory, info, DEFAULT_CPU) + ["-c", code, scratch]
        completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    words = completed.stdout.split()
    if completed.returncode != 0 or len(words) != 2 or words[0] != "aarch64":
        raise Arm64Error(
            "the emulated aarch64 Python does not start LiteRT: "
            + (completed.stderr.strip().splitlines() or ["no output"])[-1]
        )
    return {"machine": words[0], "litert_version_reported": words[1]}


@contextlib.contextmanager
def _locked(directory: str):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_environment(
    directory: str | None = None,
    progress: Callable[[str], None] | None = print,
    force: bool = False,
) -> dict:
    """Builds the emulated arm64 environment (see the module docstring).

    Needs a Debian host with apt, and the network to Debian's archive and PyPI
    once; root to install debootstrap if it is missing. A complete environment
    for the host's ai-edge-litert is kept (nothing is downloaded); a partial or
    outdated one is completed. Safe to call from several processes at once.

    Returns:
      The environment's info (versions, paths), also written to
      `environment.json` in the directory.

    Raises:
      Arm64Error: a step failed; the message names it and its last output.
    """
    if is_native():
        return check_environment(directory)
    directory = os.path.abspath(directory or default_directory())
    version = host_litert_version()
    with _locked(directory):
        if not force:
            with contextlib.suppress(Arm64Error):
                return check_environment(directory)
        stamp = os.path.join(directory, _STAMP)
        if os.path.exists(stamp):
            os.remove(stamp)
        _ensure_host_tools(progress)
        mirror = debian_mirror()
        info = {"litert_version": version, "root_suite": ROOT_SUITE, "qemu_suite": QEMU_SUITE}
        info["qemu"] = _fetch_qemu(directory, mirror, progress)
        _make_root(directory, mirror, progress)
        _fetch_wheels(directory, version, progress)
        info["qemu_version"] = _run(
            [os.path.join(directory, info["qemu"]), "--version"], "qemu-aarch64 --version"
        ).splitlines()[0]
        info.update(_probe(directory, info))
        if info["litert_version_reported"] not in (version, "unknown"):
            raise Arm64Error(
                f"the arm64 site has ai-edge-litert {info['litert_version_reported']}, "
                f"expected {version}"
            )
        with open(stamp, "w", encoding="utf-8") as stream:
            json.dump(info, stream, indent=2)
        _log(progress, f"arm64 environment ready in {directory}: {info['qemu_version']}")
        return info


def _command(directory: str, info: dict, cpu: str) -> list[str]:
    if not info.get("qemu"):
        return [sys.executable]
    root = os.path.join(directory, "root")
    return [
        os.path.join(directory, info["qemu"]),
        "-cpu",
        cpu,
        "-L",
        root,
        os.path.join(root, PYTHON),
    ]


def run(
    content: bytes,
    inputs: np.ndarray,
    runtimes: Sequence[str] = ("default", "builtin"),
    batch_size: int = 256,
    num_threads: int = 2,
    cpu: str = DEFAULT_CPU,
    directory: str | None = None,
) -> dict[str, np.ndarray]:
    """Runs the file on arm64 kernels, once per runtime.

    Args:
      content: the .tflite flatbuffer.
      inputs: exactly what to feed (int8 codes for an int8 input), batch first.
      runtimes: names from `litert_worker.RUNTIMES`: "default" (XNNPACK
        delegate), "builtin" (optimized builtin kernels), "reference".
      cpu: QEMU's CPU model (`qemu-aarch64 -cpu help` lists them).
      directory: the environment (default `default_directory()`).

    Returns:
      Each runtime's outputs, plus `machine` and `litert_version` (strings).

    Raises:
      Arm64Error: no environment, or the emulated run failed.
    """
    directory = os.path.abspath(directory or default_directory())
    info = check_environment(directory)
    command = _command(directory, info, cpu)
    env = dict(os.environ)
    if info.get("qemu"):
        env["PYTHONPATH"] = os.path.join(directory, "site")
    with tempfile.TemporaryDirectory(prefix="tfquant-arm64-") as scratch:
        request, result = os.path.join(scratch, "request.npz"), os.path.join(scratch, "result.npz")
        np.savez(
            request,
            model=np.frombuffer(content, np.uint8),
            inputs=np.ascontiguousarray(inputs),
            runtimes=np.array(list(runtimes)),
            batch_size=batch_size,
            num_threads=num_threads,
        )
        completed = subprocess.run(
            [*command, _worker_in(scratch), request, result],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if completed.returncode != 0 or not os.path.exists(result):
            lines = (completed.stderr or completed.stdout).strip().splitlines() or ["no output"]
            raise Arm64Error(
                f"the arm64 run failed (exit {completed.returncode}, cpu {cpu}): {lines[-1]}"
            )
        with np.load(result, allow_pickle=False) as loaded:
            outputs = {key: loaded[key] for key in loaded.files}
    outputs["machine"] = str(outputs["machine"])
    outputs["litert_version"] = str(outputs["litert_version"])
    return outputs
