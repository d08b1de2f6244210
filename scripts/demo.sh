#!/usr/bin/env bash
# The main job, end to end on the embedded synthetic cohort: regenerate the DICOM cohort that data.dvc
# tracks (deterministic, so the bytes match), put it in the DVC cache, and run the pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
export PATH="$PWD/$bin:$PATH" # DVC stages run `python`: the environment's

if [ -d data ] && [ "$(dvc status --json data.dvc)" = "{}" ]; then
  echo "demo: data/ already matches data.dvc and is in the DVC cache"
else
  rm -rf data
  shiftguard cohort generate --out data
  # Hash the regenerated cohort into the DVC cache; data.dvc must come out unchanged.
  cp data.dvc .data.dvc.tracked
  dvc commit --force --quiet data.dvc
  if ! cmp -s data.dvc .data.dvc.tracked; then
    mv .data.dvc.tracked data.dvc
    echo "demo: the regenerated cohort differs from what data.dvc tracks; generation is not" \
      "deterministic on this machine (see tests/integration/test_data_dvc.py)" >&2
    exit 1
  fi
  rm .data.dvc.tracked
fi
# the development key export signs the bundle with (kept if already there; never in git): it lives
# in the user's configuration folder, and its public half is trusted on this machine only
shiftguard keys generate --development
# each stage logs what it does; DVC's own "Running stage"/"Updating lock file" lines are left out
if ! dvc repro --quiet; then
  echo "demo: dvc repro failed (the stage's error is above); 'dvc repro' again names the stage" >&2
  exit 1
fi
dvc status
python - <<'PY'
import json
from pathlib import Path

from shiftguard.tracking import trained_model

# MLflow's run id and registry number live in MLflow only (no DVC output names them): found by
# the model file's SHA-256, which the training run is tagged with
info = trained_model(Path("artifacts/train/model.pt"))
report = json.load(open("reports/validate/metrics.json"))
auc = lambda name: report.get(name, {}).get("auroc", {})
if info is None:
    print("\ndemo: no MLflow run in this store trained artifacts/train/model.pt (restored by DVC?)")
else:
    print(f"\ndemo: registered {info.registered_model} version {info.version} "
          f"(MLflow run {info.run_id})")
for name, label in (("test", "internal test"), ("external", "unseen, pooled")):
    a = auc(name)
    if a.get("value") is not None:
        print(f"      {label:>14}: AUROC {a['value']:.3f} (95% CI {a['low']:.3f}-{a['high']:.3f})")
def ci(m):
    if (m or {}).get("value") is None or m.get("low") is None:
        return "n/a"
    if m["low"] == m["high"]:  # every bootstrap resample scored the same: no interval to show
        return f"{m['value']:.3f} (interval collapsed)"
    return f"{m['value']:.3f} ({m['low']:.3f}-{m['high']:.3f})"
threshold = "n/a" if report.get("threshold") is None else f"{report['threshold']:.3f}"
print(f"      per unseen scanner (sensitivity, specificity at the val threshold {threshold}):")
for model, s in (report.get("external_scanners") or {}).items():
    auroc = f"n/a, {s['reason']}" if s.get("reason") else ci(s.get("auroc"))
    print(f"        {model} (n={s.get('n')}, {s.get('n_positive')} positive): AUROC {auroc}; "
          f"sensitivity {ci(s.get('sensitivity'))}, specificity {ci(s.get('specificity'))}")
export = json.load(open("artifacts/export/export.json"))
print(f"      bundle: {export['bundle']} (version {export['version']}, {export['bundle_bytes']:,} "
      f"bytes, sha256 {export['bundle_sha256'][:16]}...; ONNX parity "
      f"{export['onnx_max_abs_diff']:.1e})")
import csv
rows = list(csv.DictReader(open("artifacts/edge/results.csv")))
pos = sum(r["result"] == "finding present" for r in rows)
print(f"      edge predict (shadow mode) on the unseen scanner: {len(rows)} series, {pos} flagged; "
      f"SR + key image per series in artifacts/edge/")
if rows:
    print(f"      read one:  dsrdump artifacts/edge/{rows[0]['sr_file']}")
drift = json.load(open("reports/monitor/metrics.json"))
if drift.get("judged"):
    windows, last = drift.get("windows", []), drift.get("window", {})
    scores = ", ".join(f"{w['unified_score']:.1f}" for w in windows)
    print(f"      drift monitor on those {drift['n_studies']} studies vs the training reference, "
          f"{len(windows)} windows by study date: unified drift score (about 0 in distribution) "
          f"{scores}; the latest window "
          f"({last.get('n')} studies, {last.get('start', '')[:10]} to {last.get('end', '')[:10]}): "
          f"{drift['n_drifted']} features drifted ({100 * drift['drift_share']:.0f}%), "
          f"alerts: {', '.join(drift['alerts']) or 'none'}")
else:
    print(f"      drift monitor: {drift.get('reason')}")
print("      drift report: reports/monitor/drift.html")
scen = json.load(open("reports/monitor/scenarios.json"))
said = []
for s in scen["scenarios"]:
    if s["onset"] is None:
        said.append(f"{s['name']} {s['false_alarms']} false alarms in {s['studies']}")
    else:
        said.append(f"{s['name']} " + (f"flagged {s['delay']} after onset"
                                       if s["delay"] is not None else "not flagged"))
print(f"      drift scenarios (reports/monitor/scenarios.json): {'; '.join(said)}")
est = scen.get("estimation")
if est:
    rows = {(r["condition"], r["method"], r["metric"]): r for r in est["table"]}
    parts = []
    for (cond, method, metric), r in sorted(rows.items()):
        if method == "cbpe" and metric == "sensitivity" and r.get("mae") is not None:
            harm = est["harm"].get(cond, {})
            parts.append(f"{cond} {r['realised']:.2f} vs {r['estimated']:.2f}"
                         + (" (harmful)" if harm.get("harmful") else ""))
    perf = [f"{s['name']} {s['performance_delay']}" for s in scen["scenarios"]
            if s.get("performance_delay") is not None]
    print(f"      label-free sensitivity, realised vs estimated (CBPE, windows of "
          f"{est['window_size']}; reports/monitor/estimation.csv): {'; '.join(parts)}")
    print(f"      performance rule flagged: {', '.join(perf) or 'no scenario'} "
          f"(studies after onset)")
PY
# last: the shadow evaluation of the edge's predictions against the radiologists' verdicts
"$bin/python" - <<'PY'
import json
shadow = json.load(open("reports/shadow/metrics.json"))
fmt = lambda m: (f"{shadow[m]:.3f} [{shadow[m + '_low']:.3f}, {shadow[m + '_high']:.3f}]"
                 if shadow.get(m) is not None else "n/a")
print(f"demo: shadow evaluation of the edge predictions vs the verified diagnoses "
      f"(data/ris/verified_diagnoses.csv):\n      "
      f"{shadow['judged']} of {shadow['studies']} studies verified ({shadow['pending']} pending); "
      f"AUROC {fmt('auroc')}, sensitivity {fmt('sensitivity')}, specificity {fmt('specificity')}; "
      f"{shadow['segments_judged']} segments judged, {shadow['segments_too_small']} too small; "
      f"flagged: {', '.join(shadow['flagged']) or 'none'}")
print("      shadow report: reports/shadow/report.html")
PY
# did this machine reproduce the committed pipeline? (README, Reproducibility: what varies by CPU)
"$bin/python" - <<'PY'
import subprocess

import yaml

shown = subprocess.run(["git", "show", "HEAD:dvc.lock"], capture_output=True, text=True)
if shown.returncode == 0:
    committed = yaml.safe_load(shown.stdout)["stages"]
    now = yaml.safe_load(open("dvc.lock"))["stages"]
    outs = lambda stage: {o["path"]: o.get("md5") for o in stage.get("outs", [])}
    differ = [name for name in now if name in committed and outs(now[name]) != outs(committed[name])]
    # the bundle carries this machine's signature (its own development key): export differs always
    signed = [name for name in differ if name != "export"]
    note = ("; the export's bundle differs only by its signature (this machine's key)"
            if "export" in differ else "")
    if signed:
        print(f"demo: outputs differ from the committed dvc.lock in stages {', '.join(signed)}"
              f"{note}; README, Reproducibility, says which figures vary with the host's CPU and "
              f"by how much")
    else:
        print(f"demo: every stage's outputs match the committed dvc.lock{note}")
PY
echo "demo: look at the results with"
echo "      $bin/mlflow ui --backend-store-uri sqlite:///mlflow.db, then"
echo "        http://127.0.0.1:5000/#/models?workflowType=machine_learning (model-training view)"
echo "      $bin/evidently ui --workspace artifacts/monitor/workspace (http://127.0.0.1:8000)"
echo "      dvc plots show; dvc metrics show; make screenshots (all of them, headless Chromium)"
echo "      the augmentation experiment (five arms, paired, on unseen scanners): make experiment"
echo "demo: done in $((SECONDS / 60)) min $((SECONDS % 60)) s"
