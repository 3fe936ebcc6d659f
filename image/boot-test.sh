#!/usr/bin/env bash
# Boot the raw image from image/build.sh under qemu (software emulation is fine)
# and check that the appliance unit reaches READY (systemd prints "Started
# appliance.service" for a Type=notify unit only after READY=1) and that
# `appliancectl status` answers through a forwarded port.  A bench-style script:
# minutes, not a test.
#
#   sudo image/boot-test.sh [--image image/out/appliance.raw] [--timeout 900] [--port 18740] [--kvm]
#
# The image is not modified: the boot uses a copy, into which a known admin token
# is written first (the shipped image has none: each box makes its own).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=$ROOT/image/out/appliance.raw
TIMEOUT=900
PORT=18740
KVM=0
while [ $# -gt 0 ]; do
  case "$1" in
    --image) IMAGE=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --kvm) KVM=1; shift ;;
    *) echo "boot-test.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "boot-test.sh: run as root (loop mount of the copy)" >&2; exit 1; }
cd "$ROOT"           # appliancectl of this checkout talks to the guest
[ -f "$IMAGE" ] || { echo "boot-test.sh: no image $IMAGE (run image/build.sh)" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null || \
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends qemu-system-x86 >/dev/null

WORK=$(mktemp -d /tmp/appliance-boot.XXXXXX)
LOOP=; QEMU=
cleanup() {
  set +e
  [ -n "$QEMU" ] && kill "$QEMU" 2>/dev/null && wait "$QEMU" 2>/dev/null
  mountpoint -q "$WORK/mnt" && umount "$WORK/mnt"
  [ -n "$LOOP" ] && losetup -d "$LOOP"
  echo "boot-test: logs in $WORK"
}
trap cleanup EXIT
T0=$(date +%s)
say() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }

say "copy of $IMAGE with a known admin token"
cp --sparse=always "$IMAGE" "$WORK/disk.raw"
python3 -c 'import secrets; print(secrets.token_hex(24))' > "$WORK/admin.token"
chmod 600 "$WORK/admin.token"
LOOP=$(losetup --find --show --partscan "$WORK/disk.raw")
mkdir -p "$WORK/mnt"
for _ in $(seq 20); do [ -b "${LOOP}p1" ] && break; sleep 0.1; done
[ -b "${LOOP}p1" ] || partx -a "$LOOP" || true     # kernels without msdos partition parsing
for _ in $(seq 20); do [ -b "${LOOP}p1" ] && break; sleep 0.1; done
mount "${LOOP}p1" "$WORK/mnt"
uid=$(awk -F: '$1=="appliance"{print $3}' "$WORK/mnt/etc/passwd")
gid=$(awk -F: '$1=="appliance"{print $4}' "$WORK/mnt/etc/passwd")
install -d -m 0750 -o "$uid" -g "$gid" "$WORK/mnt/var/lib/appliance"
install -m 0600 -o "$uid" -g "$gid" "$WORK/admin.token" "$WORK/mnt/var/lib/appliance/admin.token"
# A test-only oneshot ordered after appliance.service: for a Type=notify unit it runs
# only once the start job finished, i.e. after READY=1; it prints the unit's state
# to the serial console (the console stops showing "Started ..." once a getty runs)
cat > "$WORK/mnt/etc/systemd/system/appliance-bootcheck.service" <<'UNIT'
[Unit]
Description=boot-test: report appliance.service after its READY
After=appliance.service
Wants=appliance.service
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "BOOTCHECK appliance.service $(systemctl show -p ActiveState --value appliance)/$(systemctl show -p SubState --value appliance) restarts=$(systemctl show -p NRestarts --value appliance) status=\"$(systemctl show -p StatusText --value appliance)\"" > /dev/ttyS0'
[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/appliance-bootcheck.service \
  "$WORK/mnt/etc/systemd/system/multi-user.target.wants/appliance-bootcheck.service"
umount "$WORK/mnt"; partx -d "$LOOP" >/dev/null 2>&1 || true; losetup -d "$LOOP"; LOOP=

# TCG (software emulation) by default: nested KVM in a cloud VM can fail outright
# ("KVM internal error ... emulation failure" on this build VM); --kvm to try it
ACCEL=tcg
[ "$KVM" -eq 1 ] && ACCEL=kvm
say "qemu-system-x86_64 (accel $ACCEL), admin forwarded to 127.0.0.1:$PORT"
qemu-system-x86_64 -machine pc,accel=$ACCEL -m 1024 -smp 2 -display none -no-reboot \
  -serial "file:$WORK/serial.log" -monitor none \
  -drive "file=$WORK/disk.raw,format=raw,if=virtio" \
  -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$PORT-:8740" -device virtio-net-pci,netdev=n0 &
QEMU=$!

ready=0; answered=0
deadline=$(( $(date +%s) + TIMEOUT ))
while [ "$(date +%s)" -lt "$deadline" ]; do
  kill -0 "$QEMU" 2>/dev/null || { say "qemu exited"; break; }
  if [ $ready -eq 0 ] && grep -aq "BOOTCHECK appliance.service active/running" "$WORK/serial.log" 2>/dev/null; then
    ready=1; say "the unit reached READY: $(grep -a BOOTCHECK "$WORK/serial.log" | tr -d '\r')"
  fi
  if [ $ready -eq 0 ] && grep -q "Failed to start.*ppliance" "$WORK/serial.log" 2>/dev/null; then
    say "the unit failed to start"; break
  fi
  # the admin listener starts before the services: status may answer before READY
  if [ $answered -eq 0 ] && python3 -m appliance.admin.ctl --url "http://127.0.0.1:$PORT/rpc" \
       --token-file "$WORK/admin.token" --timeout 5 status > "$WORK/status.txt" 2>&1; then
    answered=1; say "appliancectl status answered:"; cat "$WORK/status.txt"
  fi
  [ $ready -eq 1 ] && [ $answered -eq 1 ] && break
  sleep 2
done
say "result: ready=$ready status_answered=$answered"
tail -n 20 "$WORK/serial.log" || true
[ $ready -eq 1 ] && [ $answered -eq 1 ]
