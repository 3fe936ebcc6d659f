"""Installing the project makes `twistd appliance` and the console scripts available.

Checked from outside, on a truly fresh venv (review M10): no system
site-packages (where the test environment's own editable install lives), the
dependencies installed with ``--no-index`` from a wheelhouse that ``pip wheel``
builds once per run, every command run with ``python -I`` (no PYTHONPATH, no
user site, no cwd on ``sys.path``) from an empty temporary directory.  So the
only way the venv can see the appliance is its own install.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.support.node_process import ROOT


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV",
                        "PYTHONUSERBASE", "PIP_USER")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """Wheels of the project's dependencies (and the build backend), via pip."""
    house = tmp_path_factory.mktemp("wheelhouse")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(house),
                          str(ROOT), "setuptools", "wheel"],
                         capture_output=True, text=True, cwd=house, env=_clean_env(),
                         timeout=300)
    assert out.returncode == 0, f"pip wheel failed (a package registry is needed):\n{out.stderr}"
    for own in house.glob("appliance-*.whl"):
        own.unlink()        # the project itself is installed from the source tree
    return house


def _run(py: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(py), "-I", "-c", code], capture_output=True, text=True,
                          cwd=cwd, env=_clean_env(), timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable-compat"])
def test_pip_install_exposes_twistd_plugin(tmp_path, wheelhouse, editable):
    """`pip install .` (and the README's editable command) into an isolated venv make twistd
    list `appliance` and install appliancectl / appliance-check / appliance-keys."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=True, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Isolation first: nothing of the test environment is visible in the venv.
    bare = _run(py, "import twisted", elsewhere)
    assert bare.returncode != 0, "the venv sees the system site-packages"
    cmd = [str(py), "-I", "-m", "pip", "install", "-q", "--no-index", "--find-links",
           str(wheelhouse)]
    cmd += ["-e", str(ROOT), "--config-settings", "editable_mode=compat"] if editable \
        else [str(ROOT)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=elsewhere, env=_clean_env(),
                         timeout=300)
    assert out.returncode == 0, out.stderr
    # Regenerate the dropin cache as the README says.
    done = _run(py, "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))",
                elsewhere)
    assert done.returncode == 0, done.stderr
    # Where everything resolves: the package and the dropin inside the venv
    # (editable: the package in the checkout, through the venv's own .pth).
    where = _run(py, "import appliance, twisted, twisted.plugins.appliance_plugin as p; "
                     "print(appliance.__file__); print(p.__file__); print(twisted.__file__)",
                 elsewhere)
    assert where.returncode == 0, where.stderr
    package, dropin, twisted_file = where.stdout.split()
    assert Path(twisted_file).is_relative_to(env_dir)
    if editable:
        assert Path(package).is_relative_to(ROOT) and Path(dropin).is_relative_to(ROOT)
        pth = list((env_dir / "lib").glob("python3*/site-packages/__editable__.appliance*.pth"))
        assert pth, "the editable install left no .pth in the venv"
    else:
        assert Path(package).is_relative_to(env_dir), package
        assert Path(dropin).is_relative_to(env_dir), dropin
    helptext = subprocess.run([str(py), "-I", "-m", "twisted", "--help"], capture_output=True,
                              text=True, cwd=elsewhere, env=_clean_env(), timeout=120).stdout
    assert "appliance" in helptext
    for script in ("appliancectl", "appliance-check", "appliance-keys"):
        assert (env_dir / "bin" / script).exists(), script
    check = subprocess.run([str(env_dir / "bin" / "appliance-check"),
                            str(ROOT / "etc" / "appliance.toml")],
                           capture_output=True, text=True, cwd=ROOT, env=_clean_env())
    assert check.returncode == 0, check.stderr
    # The installed package finds its service plugins package.
    found = _run(py, "from appliance.plugin import plugin_package; "
                     "print(plugin_package().__name__)", elsewhere)
    assert found.stdout.strip() == "appliance.plugins", found.stderr
