"""The two install sets (requirements-cpu.txt, requirements-cuda.txt) as a user's pip sees them."""
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETS = ("cpu", "cuda")


def requirements(path: Path) -> dict[str, str]:
    """name -> specifier of a requirements file, following `-r` includes."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            out.update(requirements(path.parent / line[3:].strip()))
        elif line and not line.startswith("-"):
            name, spec = re.match(r"([A-Za-z0-9_.\-\[\],]+)\s*(.*)", line).groups()
            out[re.sub(r"\[.*\]", "", name).lower().replace("_", "-")] = spec
    return out


def test_fbgemm_builds_never_share_a_set():
    cpu, cuda = (requirements(ROOT / f"requirements-{s}.txt") for s in SETS)
    assert "fbgemm-gpu-cpu" in cpu and "fbgemm-gpu" not in cpu
    assert "fbgemm-gpu" in cuda and "fbgemm-gpu-cpu" not in cuda
    # One pairing for both sets: the same torch and the same FBGEMM release.
    assert cpu["torch"] == cuda["torch"] == "==2.13.0"
    assert cpu["fbgemm-gpu-cpu"] == cuda["fbgemm-gpu"] == "==1.8.0"
    # The shared file carries neither torch nor any FBGEMM build.
    shared = requirements(ROOT / "requirements.txt")
    assert not {"torch", "fbgemm-gpu", "fbgemm-gpu-cpu", "triton"} & set(shared)


def pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.slow  # pip fetches the metadata of ~90 distributions: about a minute per set
@pytest.mark.skipif(not pypi_reachable(), reason="PyPI (https://pypi.org) is unreachable from here")
@pytest.mark.parametrize("which", SETS)
def test_set_resolves_against_plain_pypi(which, tmp_path):
    # A user's pip: no pip.conf, no local wheel directory, no extra index; only PyPI.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--timeout", "30", "--report", str(report), "-r", str(ROOT / f"requirements-{which}.txt")],
        env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
              for i in json.loads(report.read_text())["install"]}
    assert chosen["torch"].split("+")[0] == "2.13.0"
    fbgemm = "fbgemm-gpu-cpu" if which == "cpu" else "fbgemm-gpu"
    other = "fbgemm-gpu" if which == "cpu" else "fbgemm-gpu-cpu"
    assert chosen[fbgemm] == "1.8.0" and other not in chosen
