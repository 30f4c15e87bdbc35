#!/usr/bin/env bash
# The whole recipe of valle's shipped default model (plugins/valle-default-model), offline, with valle's own
# commands. Every step resumes: rerun the script after an interruption and it goes on where it stopped.
#
#   bash recipes/default-model/run.sh [WORK]          (default WORK: ~/valle-default-model)
#
# Environment: SCALE (corpus size, 1 = ~3 h of speech), STEPS (training steps), DEVICE (where `valle prepare`
# encodes: auto, cpu, cuda; training takes a GPU by itself when there is one).
# On the 2-core CPU we build on: corpus ~2 min, prepare ~3 min (with the aligner), training ~1.2 s/step
# (7000 steps: 2.3 h).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=${1:-$HOME/valle-default-model}
valle=${VALLE:-$root/.venv/bin/valle}
python=${PYTHON:-$root/.venv/bin/python}
mkdir -p "$work"

# 1. speech: 32 training speakers (espeak-ng variants, mbrola us1/us3/en1 at two pitches, piper joe), and the
#    evaluation set: valle's held-out sentences in the held-out mbrola us2 voice, and in every training voice
"$python" "$here/make_corpus.py" "$work" --scale "${SCALE:-1.0}"

# 2. dataset: phonemes + offline mel-codec tokens + similar-utterance lists
"$valle" prepare "$work/voices" -o "$work/dataset" -c "$here/config.yaml" --max-duration 10 \
  --device "${DEVICE:-auto}"

# 3. training (resumes from the run folder's latest checkpoint); `valle tui "$work/run"` watches it
"$valle" train "$here/config.yaml" -o "$work/run" --set "data.paths=[$work/dataset]" \
  ${STEPS:+--set "train.steps=$STEPS"} < /dev/null

# 4. the shipped file: fp16 weights with the config, symbol map and codec inside
"$valle" export "$work/run" --dtype fp16 -o "$work/valle-default.safetensors"

echo "model: $work/valle-default.safetensors (to ship it, copy it to plugins/valle-default-model/src/valle_default_model/)"

# 5. quality on sentences and a voice it never saw (as bench/default_model.py does for docs/benchmarks.md);
#    the offline ASR is the valle-pocketsphinx plugin, installed beside the run, not into the virtualenv
"$python" -m pip install -q --no-deps --no-build-isolation --target "$work/site" "$root/plugins/valle-pocketsphinx"
PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}" "$valle" eval "$work/valle-default.safetensors" \
  --texts "$work/eval/texts.txt" --refs "$work/eval/refs" --impostors "$work/eval/impostors" \
  --transcriber pocketsphinx --verifier resemblyzer -o "$work/eval-report"
