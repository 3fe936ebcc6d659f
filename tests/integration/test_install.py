"""Installing the project makes `twistd appliance` and the console scripts available."""

from __future__ import annotations

import subprocess
import venv

import pytest

from tests.support.node_process import ROOT


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable-compat"])
def test_pip_install_exposes_twistd_plugin(tmp_path, editable):
    """`pip install .` (and the README's editable command) make twistd list `appliance`
    and install appliancectl / appliance-check / appliance-keys."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    cmd = [str(py), "-m", "pip", "install", "-q", "--no-deps",
           "--disable-pip-version-check"]
    cmd += ["-e", str(ROOT), "--config-settings", "editable_mode=compat"] if editable else [str(ROOT)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    # Regenerate the dropin cache as the README says, then ask twistd (from elsewhere).
    subprocess.run([str(py), "-c", "from twisted.plugin import IPlugin, getPlugins; "
                    "list(getPlugins(IPlugin))"], check=True, cwd=tmp_path)
    helptext = subprocess.run([str(py), "-m", "twisted", "--help"], capture_output=True,
                              text=True, cwd=tmp_path, timeout=120).stdout
    assert "appliance" in helptext
    for script in ("appliancectl", "appliance-check", "appliance-keys"):
        assert (env_dir / "bin" / script).exists(), script
    check = subprocess.run([str(env_dir / "bin" / "appliance-check"),
                            str(ROOT / "etc" / "appliance.toml")],
                           capture_output=True, text=True, cwd=ROOT)   # paths are cwd-relative
    assert check.returncode == 0, check.stderr
    # The installed package finds its service plugins package.
    found = subprocess.run([str(py), "-c", "from appliance.plugin import plugin_package; "
                            "print(plugin_package().__name__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert found.stdout.strip() == "appliance.plugins", found.stderr
