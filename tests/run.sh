#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run it.
#   bash tests/run.sh [pytest args...]
# As root it apt-get installs the real peers (redis-server, ...); it pip-installs the
# project (editable, so twistd sees the dropin) with its test extras; then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(systemd redis-server redis-tools redis-sentinel procps iproute2 nftables iputils-ping keepalived busybox bind9 bind9-utils bind9-dnsutils kea-admin slapd ldap-utils sip-tester bird2 isc-dhcp-client kea-dhcp6-server)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "== apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # slapd: no system directory; the tests build their own (tests/support/slapd_server.py)
    echo "slapd slapd/no_configuration boolean true" | debconf-set-selections
    mkdir -p /etc/ldap && touch /etc/ldap/noslapd     # and no system slapd started
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "== not root: cannot install ${missing[*]}; tests needing them will skip" >&2
  fi
fi

PY=${PYTHON:-python3}
# A Python that may not be pip-installed into (Debian's system python3: no pip, or
# PEP 668 "externally-managed-environment") gets a venv of its own: .venv (or $APPLIANCE_VENV).
if ! "$PY" -c 'import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(1 if sys.prefix == sys.base_prefix and managed else 0)' 2>/dev/null \
   || ! "$PY" -m pip --version >/dev/null 2>&1; then
  VENV=${APPLIANCE_VENV:-.venv}
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== $PY is externally managed or has no pip: creating the venv $VENV"
    if ! "$PY" -m venv "$VENV" 2>/dev/null; then
      if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        rm -rf "$VENV"
        apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends python3-venv >/dev/null
        "$PY" -m venv "$VENV"
      else
        echo "== cannot create a venv: install python3-venv (apt-get install python3-venv)" >&2
        exit 1
      fi
    fi
  fi
  PY="$VENV/bin/python"
  export PATH="$(cd "$VENV/bin" && pwd):$PATH"     # twistd, appliancectl of the venv
fi
echo "== pip install -e .[test] ($PY)"
"$PY" -m pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
# Twisted caches plugin lists; refresh it so twistd sees the appliance dropin.
"$PY" -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

echo "== pytest"
exec "$PY" -m pytest "$@"
