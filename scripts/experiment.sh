#!/usr/bin/env bash
# The augmentation experiment (conf/design/<design>.yaml; README, "Does augmentation help?"):
#   1. the embedded cohort ingested and split (as `make demo` leaves it; `dvc repro split` otherwise)
#   2. the in-distribution hold-out set and the unseen scanners' sets the design names, generated,
#      ingested and split once (shiftguard experiment prepare)
#   3. every cell of the design with Hydra's multirun sweeper (arms x training seeds x split seeds)
#   4. the report: reports/experiment/ (table, figure, paired tests) and an MLflow run
# Usage: scripts/experiment.sh [reduced|full]
set -euo pipefail
cd "$(dirname "$0")/.."
design="${1:-reduced}"
bin=.venv/bin
export PATH="$PWD/$bin:$PATH"
stamp() { date +%s; }
began=$(stamp)

if [ ! -f artifacts/ingest/manifest.csv ] || [ ! -f artifacts/split/dataset.csv ]; then
  if [ ! -d data/dicom ]; then
    echo "experiment: no embedded cohort under data/; run \`make demo\` first" >&2
    exit 2
  fi
  dvc repro split
fi
# the hold-out and unseen-scanner cohorts the design names (design.holdout_cohort, external_cohort),
# generated, ingested and split once into artifacts/experiment/cohorts/<cohort>/
shiftguard experiment prepare --design "$design"
prepared=$(stamp)

runs="artifacts/experiment/runs/$design"
rm -rf "$runs"
python -m shiftguard.experiment.runner --multirun "+design=$design" "hydra.sweep.dir=$runs"
swept=$(stamp)
shiftguard experiment report --runs "$runs" --out reports/experiment
echo "experiment: data $(( (prepared - began) / 60 )) min, sweep $(( (swept - prepared) / 60 )) min," \
  "report $(( ($(stamp) - swept) )) s (design $design)"
