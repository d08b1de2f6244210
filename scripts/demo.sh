#!/usr/bin/env bash
# The main job, end to end on the embedded synthetic cohort: regenerate the DICOM cohort that data.dvc
# tracks (deterministic, so the bytes match), put it in the DVC cache, and run the pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
export PATH="$PWD/$bin:$PATH"   # DVC stages run `python`: the environment's

if [ -d data ] && [ "$($bin/dvc status data.dvc --json 2>/dev/null)" = "{}" ]; then
  echo "demo: data/ already matches data.dvc"
else
  rm -rf data
  $bin/shiftguard cohort generate --out data
  if [ "$($bin/dvc status data.dvc --json)" != "{}" ]; then
    $bin/dvc status data.dvc
    echo "demo: the regenerated cohort does not match data.dvc: generation is not deterministic here" >&2
    exit 1
  fi
fi
$bin/dvc commit --force --quiet data.dvc   # fills the DVC cache so `dvc push` has the cohort
$bin/dvc repro
$bin/dvc status
$bin/dvc metrics show
