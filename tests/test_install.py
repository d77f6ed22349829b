"""The package builds from a clean copy of the repo into a fresh venv (one abi3 wheel) and imports."""
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "target", "__pycache__", "*.so", ".pytest_cache", "artifacts",
                              "dist", "build")


@pytest.mark.slow
def test_clean_copy_builds_one_abi3_wheel_and_imports(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=SKIP)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # reuse compiled Rust dependencies between runs; the crate itself is still built from the copy
    env = {**os.environ, "CARGO_TARGET_DIR": str(REPO / "rustbpe" / "target" / "install-test"),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)
    subprocess.run([python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", source],
                   check=True, env=env, timeout=900)
    wheels = list((tmp_path / "dist").glob("nanochat-*.whl"))
    assert len(wheels) == 1 and "-cp310-abi3-" in wheels[0].name, wheels
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", wheels[0]], check=True, env=env, timeout=300)
    probe = ("import rustbpe, nanochat, tasks, scripts, pathlib;"
             "print(pathlib.Path(nanochat.__file__).parent); print(rustbpe.Tokenizer)")
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    installed = Path(result.stdout.splitlines()[0])
    assert env_dir in installed.parents  # imported from the fresh venv, not from the working tree
    shipped = {p.relative_to(installed).as_posix() for p in installed.rglob("*") if p.is_file()}
    tracked = {p.relative_to(REPO / "nanochat").as_posix() for p in (REPO / "nanochat").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert tracked <= shipped, f"files missing from the wheel: {sorted(tracked - shipped)}"


def test_setup_without_cargo_says_how_to_get_it(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    (bin_dir / "python3").symlink_to(os.path.realpath(sys.executable))  # a real binary, not a pyenv shim
    result = subprocess.run(["/bin/bash", "-c", "source scripts/setup.sh"], cwd=REPO, capture_output=True,
                            text=True, env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cargo (Rust) not found; install it with:"), result.stderr
