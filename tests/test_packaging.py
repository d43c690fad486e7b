"""The installed package: megapixel's Triton kernels import as `megapixel_kernels`, beside Hugging Face's `kernels`
(which transformers 5 requires) and transformers' ImageGPT, in one process, wherever Python starts and however
megapixel was installed."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a wheel is not built from: environments, caches and run outputs.
BUILD_IGNORES = (".git", ".venv", ".device-wheels", "build", "*.egg-info", "__pycache__", "runs", "demo")
# All three in one process; `from kernels import CUDAProperties` is what transformers' hub-kernels integration
# imports, and it fails when `kernels` resolves to a folder of this repository.
TOGETHER = """
import kernels
from kernels import CUDAProperties
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling
import megapixel_kernels.attention, megapixel_kernels.norm
import megapixel.cli, megapixel.engine.loop, megapixel.evaluation.commands, megapixel.planning.search
from megapixel.model import ops
assert "site-packages" in kernels.__file__, kernels.__file__
print(megapixel_kernels.attention.__file__)
"""


def run_python(code: str, cwd: Path, *flags: str, env: dict | None = None) -> str:
    done = subprocess.run(
        [sys.executable, *flags, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]  # DeepSpeed logs a line of its own to stdout on import


@pytest.mark.parametrize("where", ["repository root", "another folder"])
def test_hf_kernels_transformers_and_megapixel_kernels_import_in_one_process(where, tmp_path):
    cwd = REPO if where == "repository root" else tmp_path
    assert Path(run_python(TOGETHER, cwd)) == REPO / "kernels" / "attention.py"


@pytest.mark.slow
def test_a_wheel_installs_the_kernels_as_megapixel_kernels_beside_hf_kernels(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info/ into the folder it builds.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*BUILD_IGNORES))
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    subprocess.run([*build, str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("megapixel-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "megapixel_kernels/attention.py" in names
    assert not any(name.startswith("kernels/") for name in names), "the wheel would claim HF's import name"
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    # -S skips this environment's .pth files, so its editable install of megapixel is not seen: megapixel comes
    # from the wheel, everything else from this environment's site-packages.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])}
    assert Path(run_python(TOGETHER, tmp_path, "-S", env=env)) == site / "megapixel_kernels" / "attention.py"
