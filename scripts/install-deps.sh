#!/usr/bin/env bash
# Install everything zramd's tests, benchmarks and VM test need on a fresh Debian 12 machine.
# Debian packages (real NBD peers and clients, qemu, fio, strace) via apt-get; Python packages into
# a venv made from Debian's /usr/bin/python3 with --system-site-packages, so python3-libnbd is
# importable.
# Idempotent: a second run is fast.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  nbd-client nbdkit nbd-server qemu-utils libnbd-bin python3-libnbd fio
  qemu-system-x86 busybox-static e2fsprogs util-linux cpio gzip gcc libc6-dev
  python3-venv python3-dev openssl gnutls-bin systemd liblzo2-dev strace
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

VENV=${ZRAMD_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[dev]'
"$VENV/bin/python" -c "import zramd._native" 2>/dev/null ||
  echo "install-deps: zramd._native (C accelerator) not built: zramd uses its Python page loops" >&2
