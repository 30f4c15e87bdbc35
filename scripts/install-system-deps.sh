#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages valle uses: espeak-ng (phonemizer backend, test speech), libsndfile,
# sox, and the mbrola voices (from the contrib/non-free sections) used to make multi-speaker test speech.
# Safe to run repeatedly; does nothing when everything is already there. Needs root (or sudo).
set -euo pipefail

want=(espeak-ng libespeak-ng1 libsndfile1 sox mbrola mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1
      mbrola-de2 mbrola-fr1)

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

# mbrola lives in contrib/non-free: enable those components on Debian's deb822 source file if present.
src=/etc/apt/sources.list.d/debian.sources
if [ -f "$src" ] && grep -q '^Components: main$' "$src"; then
  $SUDO sed -i 's/^Components: main$/Components: main contrib non-free/' "$src"
fi
if [ -f /etc/apt/sources.list ] && grep -qE '^deb .*debian.* main$' /etc/apt/sources.list; then
  $SUDO sed -i -E 's/^(deb .*debian.* main)$/\1 contrib non-free/' /etc/apt/sources.list
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# The mbrola voices are optional (tests skip what is missing); espeak-ng and libsndfile are not.
$SUDO apt-get install -y -qq --no-install-recommends espeak-ng libespeak-ng1 libsndfile1 sox >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends mbrola mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1 \
  mbrola-de2 mbrola-fr1 >/dev/null || echo "note: mbrola voices unavailable; tests that use them will skip" >&2
