"""Benchmarks run without pytest: `python bench/X.py` works after the README's first
command (`pip install -e .`, no test extras).

Each check runs in a fresh interpreter where ``import pytest`` fails
(``sys.modules["pytest"] = None``), from the project root as `python bench/X.py` would.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.node_process import ROOT

BENCHES = ["dhcp4", "dns", "dhcp4_cpu", "report", "store", "failover", "dhcp6"]

#: Support modules the benches import lazily, on their run paths.
LAZY = {
    "dns": ["tests.support.named_server"],
    "store": ["tests.support.redis_server"],
    "dhcp4": ["tests.support.cluster_lab", "tests.support.node_process"],
    "dhcp6": ["tests.support.node_process", "tests.support.dhcp6_client"],
}


def _without_pytest(code: str) -> subprocess.CompletedProcess:
    prelude = "import sys; sys.modules['pytest'] = None; sys.path.insert(0, '.'); "
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("name", BENCHES)
def test_bench_imports_without_pytest(name):
    """`import bench.NAME` works with pytest blocked."""
    out = _without_pytest(f"import bench.{name}")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", [b for b in BENCHES if b != "report"])
def test_bench_help_without_pytest(name):
    """`python bench/NAME.py --help` prints its usage with pytest blocked."""
    out = _without_pytest(f"import runpy; sys.argv = ['bench/{name}.py', '--help']; "
                          f"runpy.run_path('bench/{name}.py', run_name='__main__')")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:"), out.stdout


@pytest.mark.parametrize("bench, module", [(b, m) for b, ms in LAZY.items() for m in ms])
def test_lazy_support_imports_without_pytest(bench, module):
    """What a bench imports on its run path also works without pytest."""
    out = _without_pytest(f"import {module}")
    assert out.returncode == 0, f"bench/{bench}.py imports {module}:\n{out.stderr}"


def test_netns_lab_imports_without_pytest():
    """The network-namespace lab (dhcp4 pair/failover, failover bench) without pytest."""
    out = _without_pytest("import tests.support.netns")
    assert out.returncode == 0, out.stderr
