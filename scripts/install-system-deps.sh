#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages valle uses: espeak-ng (phonemizer backend, test speech), libsndfile,
# libportaudio2 (playback: `valle synth --play`), sox, python3-venv and a compiler (webrtcvad, used by the dev
# extra, builds from source), and the mbrola voices (Debian contrib/non-free, Ubuntu multiverse) that make
# multi-speaker test speech, and Chromium with its driver (the test that drives `valle serve`'s web UI).
# Does nothing when the required packages are there. The mbrola voices are optional: when they cannot be
# installed, that is remembered (~/.cache/valle/mbrola-unavailable) so later runs do not retry every time.
set -euo pipefail

required=(espeak-ng libespeak-ng1 libsndfile1 libportaudio2 sox python3-venv python3-dev build-essential)
optional=(mbrola mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1 mbrola-de2 mbrola-fr1)
stamp="${XDG_CACHE_HOME:-$HOME/.cache}/valle/mbrola-unavailable"
browser=(chromium chromium-driver)
browser_stamp="${XDG_CACHE_HOME:-$HOME/.cache}/valle/browser-unavailable"

missing() {
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}
need=$(missing "${required[@]}")
want=""
[ -f "$stamp" ] || want=$(missing "${optional[@]}")
web=""
[ -f "$browser_stamp" ] || web=$(missing "${browser[@]}")
[ -z "$need" ] && [ -z "$want" ] && [ -z "$web" ] && exit 0

if ! command -v apt-get >/dev/null; then
  [ -z "$need" ] && exit 0
  echo "install-system-deps: not a Debian/Ubuntu system; install these yourself: $need" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO="sudo"
  else
    [ -z "$need" ] && exit 0  # only optional packages missing: carry on without them
    echo "install-system-deps: run as root or with sudo to install: $need" >&2
    exit 1
  fi
fi

# mbrola lives in contrib/non-free on Debian: enable those components on the deb822 source file if present.
src=/etc/apt/sources.list.d/debian.sources
if [ -n "$want" ] && [ -f "$src" ] && grep -q '^Components: main$' "$src"; then
  $SUDO sed -i 's/^Components: main$/Components: main contrib non-free/' "$src"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
if [ -n "$need" ]; then
  # shellcheck disable=SC2086
  $SUDO apt-get install -y -qq --no-install-recommends $need >/dev/null
fi
if [ -n "$want" ]; then
  # shellcheck disable=SC2086
  if ! $SUDO apt-get install -y -qq --no-install-recommends $want >/dev/null 2>&1; then
    echo "install-system-deps: mbrola voices unavailable here; tests that use them will skip" >&2
    mkdir -p "$(dirname "$stamp")" && touch "$stamp"
  fi
fi
if [ -n "$web" ]; then
  # shellcheck disable=SC2086
  if ! $SUDO apt-get install -y -qq --no-install-recommends $web >/dev/null 2>&1; then
    echo "install-system-deps: chromium unavailable here; the web UI test will skip" >&2
    mkdir -p "$(dirname "$browser_stamp")" && touch "$browser_stamp"
  fi
fi
