"""Install the appliance: ``pip install .`` (or the editable command in README.md)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "appliance" / "__init__.py").read_text()).group(1)

setup(
    name="appliance",
    version=VERSION,
    description="Twisted high-availability appliance for DHCP, SIP, DNS and encapsulation services",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The top-level plugins/ folder is installed as appliance.plugins (a bare
    # top-level "plugins" package would collide in site-packages); etc/ ships
    # inside the package so the demo config is there without a checkout.
    packages=find_packages(include=["appliance", "appliance.*", "services", "services.*"])
    + ["appliance.plugins", "appliance.etc", "twisted.plugins"],
    package_dir={"appliance.plugins": "plugins", "appliance.etc": "etc"},
    package_data={"appliance.etc": ["*.toml", "cluster/*.toml", "*.md"], "twisted.plugins": ["appliance_plugin.py"]},
    install_requires=[
        "twisted>=24.7",
        "pyroute2>=0.7",
        "dnspython>=2.4",
        "ldap3>=2.9",
        "pyopenssl>=24",
        "cryptography>=42",
        "service_identity>=24",
        "txredisapi>=1.6,<1.7",
        "prometheus_client>=0.20",
        "attrs>=23",
        "sortedcontainers>=2.4",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-twisted>=1.14", "pytest-rerunfailures>=14", "hypothesis>=6"],
    },
    entry_points={
        "console_scripts": [
            "appliancectl = appliance.admin.ctl:main",
            "appliance-check = appliance.tap:check_main",
            "appliance-keys = appliance.cluster.keys:main",
            "appliance-en = services.encap.en:main",
        ],
    },
)
