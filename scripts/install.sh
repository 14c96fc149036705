#!/usr/bin/env bash
# Install everything stapctl and its lab need on a Debian/Ubuntu machine (idempotent).
# Packages come from the apt sources and Python index configured on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  systemtap systemtap-runtime linux-headers-amd64 qemu-system-x86 busybox-static
  dropbear-bin kmod cpio openssh-client openssh-server python3-venv sudo
  systemd chromium  # systemd-analyze checks schedules' units; chromium opens HTML reports
  tmux  # the live merged view is checked in a real terminal
  redis-server  # the engine's broker, started on loopback by the tests that need it
  postgresql  # a shared run history; the tests start their own server on loopback
  mmdebstrap zstd  # build roots of other Debian suites; their zstd-compressed kernels
)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "stapctl: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

# A second, older kernel release lets the tests plan and run across two kernels. The
# archive moves, so the release is worked out now: the newest one older than the default.
current=$(dpkg-query -W -f='${Depends}' linux-headers-amd64 | grep -o 'linux-headers-[^ ,]*' | head -1)
previous=$(apt-cache search --names-only '^linux-headers-[0-9.]+-[0-9]+-amd64$' \
  | awk '{print $1}' | sort -V | grep -x -B1 -- "$current" | grep -vx -- "$current" || true)
if [ -n "$previous" ] && ! dpkg-query -W -f='${Status}' "$previous" 2>/dev/null \
    | grep -q "install ok installed"; then
  echo "stapctl: installing $previous (a second kernel for the tests)" >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "$previous" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
echo "stapctl: installed ($(.venv/bin/stapctl --version))" >&2
