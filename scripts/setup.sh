#!/usr/bin/env bash
# Sets up everything valle needs on a Debian/Ubuntu machine and links the virtualenv as ./.venv.
#
# The virtualenv lives outside the checkout, in ~/.cache/valle/venvs/<hash of the dependency files>, so every
# clone (CI's fresh ones included) reuses it and it is rebuilt only when pyproject.toml, constraints/torch.txt
# or a plugin's pyproject.toml changes. The checkout itself is installed editable (a few seconds).
# torch and torchaudio are installed as the matched pair in constraints/torch.txt (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-system-deps.sh

PY=${PYTHON:-python3}
"$PY" -c "import sys; assert sys.version_info >= (3, 11)" 2>/dev/null \
  || { echo "setup: Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
# Only what changes the installed packages goes into the hash (not, say, pytest settings in pyproject.toml).
hash=$("$PY" - <<'PYEOF'
import glob, hashlib, json, tomllib
parts = []
for path in ["pyproject.toml", *sorted(glob.glob("plugins/*/pyproject.toml"))]:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    project = data.get("project", {})
    parts.append([path, data.get("build-system", {}).get("requires"), project.get("requires-python"),
                  project.get("dependencies"), project.get("optional-dependencies")])
parts.append(open("constraints/torch.txt").read())
parts.append("recipe 2: dev extra + deepspeed")  # bump when the install steps below change
print(hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16])
PYEOF
)
cache=${VALLE_VENV_CACHE:-$HOME/.cache/valle/venvs}
venv=$cache/$hash
mkdir -p "$cache"
# One setup at a time per cache: a second one waits instead of deleting a half-built virtualenv.
exec 9>"$cache/.lock"
flock 9

if [ ! -f "$venv/.complete" ]; then
  echo "setup: building the virtualenv $venv (once per dependency change; a few minutes)" >&2
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip "setuptools>=77,<81" wheel  # webrtcvad (resemblyzer) needs pkg_resources
  # The pair first, so nothing else can pull in a different torch.
  "$venv/bin/python" -m pip install -q -c constraints/torch.txt torch torchaudio
  "$venv/bin/python" -m pip install -q -c constraints/torch.txt -e '.[dev]'
  # DeepSpeed builds against the installed torch, so it needs that torch in its build environment
  "$venv/bin/python" -m pip install -q -c constraints/torch.txt --no-build-isolation '.[deepspeed]'
  touch "$venv/.complete"
  # keep the two newest virtualenvs; each is ~5 GB
  ls -1dt "$cache"/*/ 2>/dev/null | tail -n +3 | xargs -r rm -rf
fi

# (Re)point the editable installs at this checkout: valle and its shipped default model (a valle.models plugin
# with no dependencies, so it can live outside the cached build); quiet and fast.
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e . -e plugins/valle-default-model 2>/dev/null \
  || "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e . -e plugins/valle-default-model
ln -sfn "$venv" .venv
