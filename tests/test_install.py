"""The README's install recipes in a clean virtual environment: `pip install .` gives the core
commands, and each extra the README names is what its commands need (issue 12: `abq deploy render`
failed with ModuleNotFoundError after `pip install .`)."""

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

UV = Path(sys.executable).parent / "uv"


def test_pip_install_then_the_deploy_extra_for_deploy_render(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([str(UV), "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    py, abq = str(venv / "bin" / "python"), str(venv / "bin" / "abq")
    install = [str(UV), "pip", "install", "-q", "--python", py]
    # From a copy: setuptools builds in the source tree, and the checkout must not gain a build/.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", ".*_cache", "__pycache__", ".hypothesis", ".venv"))  # fmt: skip
    subprocess.run([*install, str(src)], check=True, capture_output=True)
    render = [abq, "deploy", "render", "--config", str(REPO / "examples" / "experiment.yaml"),
              "--out", str(tmp_path / "out"), "--bootstrap-servers", "kafka:9092"]  # fmt: skip
    r = subprocess.run(render, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "pip install 'abqueue[deploy]'" in r.stderr, r.stderr
    # abq report needs the analysis extra, and says so before reading anything.
    r = subprocess.run([abq, "report", "--config", str(REPO / "examples" / "experiment.yaml"), "--input",
                        str(tmp_path / "none.jsonl")], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "pip install 'abqueue[analysis]'" in r.stderr, r.stderr
    subprocess.run([*install, f"{src}[deploy]"], check=True, capture_output=True)
    r = subprocess.run(render, capture_output=True, text=True)
    assert r.returncode == 0 and "validated" in r.stdout, r.stderr
    assert subprocess.run([abq, "--help"], capture_output=True).returncode == 0
