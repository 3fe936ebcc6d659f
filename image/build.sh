#!/usr/bin/env bash
# Build the appliance image: a Debian rootfs (debootstrap) with the appliance in a
# venv under /opt/appliance, redis-server, the systemd unit enabled and a default
# config; then a tarball of it and a raw, BIOS-bootable disk image.
#
#   sudo image/build.sh [--out DIR] [--suite bookworm] [--mirror URL] [--size 3G]
#                       [--no-disk] [--keep-rootfs]
#
# Needs root, network access to the Debian mirror (wheels come from the host's pip), and
# the loop driver for the disk image.  Installs its own tools (debootstrap,
# fdisk, e2fsprogs) with apt-get when they are missing.  Slow (minutes): not a
# test; image/boot-test.sh boots the result under qemu.
#
# Output in DIR (default image/out):
#   rootfs/                    the tree (removed unless --keep-rootfs)
#   appliance-rootfs.tar.gz    the rootfs as a tarball (numeric owners)
#   appliance.raw              raw disk: MBR, one ext4 partition (LABEL=approot), extlinux
#   build.log                  what ran, with the time each stage took
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/image/out
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
SIZE=3G
DISK=1
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --suite) SUITE=$2; shift 2 ;;
    --mirror) MIRROR=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --no-disk) DISK=0; shift ;;
    --keep-rootfs) KEEP=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "build.sh: run as root" >&2; exit 1; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RFS=$OUT/rootfs
LOG=$OUT/build.log
MNT=$OUT/mnt
LOOP=
T0=$(date +%s)
: > "$LOG"
say() { echo "== [$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

cleanup() {
  set +e
  for m in "$MNT/dev" "$MNT/proc" "$MNT/sys" "$MNT" "$RFS/dev" "$RFS/proc" "$RFS/sys"; do
    mountpoint -q "$m" && umount -l "$m"
  done
  [ -n "$LOOP" ] && losetup -d "$LOOP"
}
trap cleanup EXIT

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v sfdisk >/dev/null || need+=(fdisk)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
  say "apt-get install ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${need[@]}" >>"$LOG" 2>&1
fi

chroot_mounts() {
  # no devpts on top of the bind: with shared propagation it would land on the host's /dev/pts
  mount --bind /dev "$RFS/dev"
  mount -t proc proc "$RFS/proc"; mount -t sysfs sysfs "$RFS/sys"
}
chroot_umounts() {
  for m in "$RFS/dev" "$RFS/proc" "$RFS/sys"; do mountpoint -q "$m" && umount -l "$m"; done
  return 0
}
in_root() { chroot "$RFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
            LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }

# rm -rf of a tree with /dev bind-mounted inside would empty the host's /dev: refuse
safe_rm_rootfs() {
  if grep -q " $RFS/" /proc/mounts; then
    echo "build.sh: mounts left under $RFS (see /proc/mounts): not removing it" >&2; exit 1
  fi
  rm -rf --one-file-system "$RFS"
}

# ---------------------------------------------------------------- 1. rootfs
safe_rm_rootfs
# extlinux boots the raw disk: it installs through the mounted filesystem, so it needs no
# disk/partition mapping (grub-install cannot map a loop partition added with partx)
PKGS=systemd-sysv,systemd-resolved,udev,dbus,procps,iproute2,nftables,iputils-ping,ca-certificates,python3,python3-venv,redis-server,redis-tools,redis-sentinel,linux-image-amd64,extlinux,syslinux-common,e2fsprogs,less
say "debootstrap $SUITE from $MIRROR ($PKGS)"
debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$RFS" "$MIRROR" >>"$LOG" 2>&1
say "debootstrap done ($(du -sh "$RFS" | cut -f1))"

echo appliance > "$RFS/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tappliance\n' > "$RFS/etc/hosts"
# for pip in the chroot (replaced below); rm first: a symlink would point cp at the HOST's /run
rm -f "$RFS/etc/resolv.conf"
cp -L /etc/resolv.conf "$RFS/etc/resolv.conf"
chroot_mounts

# ---------------------------------------------------------------- 2. the appliance
say "venv /opt/appliance with the appliance from $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'the working tree')"
mkdir -p "$RFS/opt/appliance/src"
if git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
  git -C "$ROOT" archive HEAD | tar -x -C "$RFS/opt/appliance/src"
else
  tar -C "$ROOT" --exclude=./image/out --exclude=./var --exclude=./.git -c . | tar -x -C "$RFS/opt/appliance/src"
fi
# Wheels are built/fetched on the host (its pip configuration, index and caches;
# cp311 like bookworm's python3), then installed in the chroot with --no-index.
HOSTPY=${PYTHON:-python3}
"$HOSTPY" -m pip wheel -q -w "$RFS/opt/appliance/wheels" "$RFS/opt/appliance/src" >>"$LOG" 2>&1
in_root python3 -m venv /opt/appliance >>"$LOG" 2>&1
in_root /opt/appliance/bin/pip install -q --disable-pip-version-check --no-index \
  --find-links /opt/appliance/wheels appliance >>"$LOG" 2>&1
rm -rf "$RFS/opt/appliance/wheels"
in_root /opt/appliance/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
mkdir -p "$RFS/opt/appliance/share"
cp "$ROOT/README.md" "$ROOT/etc/README.md" "$RFS/opt/appliance/share/" 2>/dev/null || true
for tool in appliancectl appliance-check appliance-keys; do
  ln -sf /opt/appliance/bin/$tool "$RFS/usr/local/bin/$tool"
done
# on the box, appliancectl talks to this box's node by default
echo "alias appliancectl='appliancectl --config /etc/appliance/appliance.toml'" \
  > "$RFS/etc/profile.d/appliance.sh"

say "user, unit, default config"
in_root useradd --system --home-dir /var/lib/appliance --shell /usr/sbin/nologin appliance 2>/dev/null || true
install -m 0644 "$ROOT/etc/systemd/appliance.service" "$RFS/etc/systemd/system/appliance.service"
install -D -m 0644 "$ROOT/etc/systemd/redis-ordering.conf" "$RFS/opt/appliance/share/redis-ordering.conf"
mkdir -p "$RFS/etc/appliance"
cat > "$RFS/etc/appliance/appliance.toml" <<'TOML'
# Default config of the appliance image: one node, embedded store, no services yet.
# Make it a cluster with `appliancectl cluster init` / `cluster join` (README:
# "Running it on two boxes"), then add [[vip]] and [services.*] (etc/README.md).
[node]
id = "appliance"
state_dir = "/var/lib/appliance"

[store]
backend = "memory"
fsync = "always"

[admin]
# all interfaces, bearer token (created at first start in the state dir, mode 0600)
listen = "tcp:8740"
token_file = "/var/lib/appliance/admin.token"
TOML
in_root systemctl enable appliance.service systemd-networkd.service systemd-resolved.service >>"$LOG" 2>&1
mkdir -p "$RFS/etc/systemd/network"
printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n' > "$RFS/etc/systemd/network/20-wired.network"
echo 'root:appliance' | in_root chpasswd                          # console login; change it
printf 'LABEL=approot / ext4 errors=remount-ro 0 1\n' > "$RFS/etc/fstab"

# ---------------------------------------------------------------- 3. smoke test (chroot)
say "smoke test in the chroot"
in_root /opt/appliance/bin/twistd --help > /dev/null
in_root /opt/appliance/bin/twistd appliance --config /etc/appliance/appliance.toml --check | tee -a "$LOG"
in_root /opt/appliance/bin/appliancectl --help > /dev/null
in_root systemd-analyze verify /etc/systemd/system/appliance.service 2>&1 | tee -a "$LOG"
in_root redis-server --version | tee -a "$LOG"
chroot_umounts
rm -f "$RFS/etc/resolv.conf"; ln -s ../run/systemd/resolve/stub-resolv.conf "$RFS/etc/resolv.conf"
in_root apt-get clean

# ---------------------------------------------------------------- 4. tarball
say "tarball"
tar -C "$RFS" --numeric-owner -czf "$OUT/appliance-rootfs.tar.gz" .
say "tarball done ($(du -h "$OUT/appliance-rootfs.tar.gz" | cut -f1))"

# ---------------------------------------------------------------- 5. raw disk image
if [ "$DISK" -eq 1 ]; then
  say "raw disk image ($SIZE)"
  rm -f "$OUT/appliance.raw"
  truncate -s "$SIZE" "$OUT/appliance.raw"
  echo 'label: dos
start=2048, type=83, bootable' | sfdisk -q "$OUT/appliance.raw" >>"$LOG" 2>&1
  LOOP=$(losetup --find --show --partscan "$OUT/appliance.raw")
  PART=${LOOP}p1
  for _ in $(seq 20); do [ -b "$PART" ] && break; sleep 0.1; done
  # a kernel without CONFIG_MSDOS_PARTITION (this build VM) does not scan the table:
  # add the partition with BLKPG
  [ -b "$PART" ] || partx -a "$LOOP" >>"$LOG" 2>&1 || true
  for _ in $(seq 20); do [ -b "$PART" ] && break; sleep 0.1; done
  [ -b "$PART" ] || { say "no partition device $PART (loop partscan unsupported?)"; exit 1; }
  # no 64bit / metadata_csum: extlinux (syslinux 6.04) cannot read those
  mkfs.ext4 -q -O ^64bit,^metadata_csum -L approot "$PART"
  mkdir -p "$MNT"
  mount "$PART" "$MNT"
  cp -a "$RFS/." "$MNT/"
  mount --bind /dev "$MNT/dev"; mount -t proc proc "$MNT/proc"; mount -t sysfs sysfs "$MNT/sys"
  KVER=$(ls "$MNT/boot" | sed -n 's/^vmlinuz-//p' | sort -V | tail -1)
  mkdir -p "$MNT/boot/extlinux"
  cat > "$MNT/boot/extlinux/extlinux.conf" <<EXT
SERIAL 0 115200
DEFAULT appliance
PROMPT 0
TIMEOUT 10
LABEL appliance
  KERNEL /boot/vmlinuz-$KVER
  INITRD /boot/initrd.img-$KVER
  APPEND root=LABEL=approot ro console=tty0 console=ttyS0,115200 net.ifnames=0
EXT
  chroot "$MNT" extlinux --install /boot/extlinux >>"$LOG" 2>&1
  cp "$MNT/usr/lib/syslinux/mbr/mbr.bin" "$OUT/.mbr.bin"
  sync
  umount "$MNT/dev" "$MNT/proc" "$MNT/sys"
  umount "$MNT"
  partx -d "$LOOP" >/dev/null 2>&1 || true
  losetup -d "$LOOP"; LOOP=
  dd if="$OUT/.mbr.bin" of="$OUT/appliance.raw" bs=440 count=1 conv=notrunc status=none
  rm -f "$OUT/.mbr.bin"
  say "raw disk done ($OUT/appliance.raw, kernel $KVER)"
fi

[ "$KEEP" -eq 1 ] || safe_rm_rootfs
say "done in $(( $(date +%s) - T0 ))s"
