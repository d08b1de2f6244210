#!/usr/bin/env bash
# Build the environment on a fresh Debian/Ubuntu machine.
#
#   scripts/setup.sh        everything: the system packages the tests and benchmarks call (dciodvfy,
#                           dcm2niix, dcmtk, the Orthanc PACS and its DICOMweb plugin; PostgreSQL for the tracking-server
#                           test; Prometheus for the scrape test and the example alert rules;
#                           headless Chromium for the reports' screenshots; DejaVu fonts
#                           for the key image's burned-in text), then .venv with the package
#                           installed editable with its pipeline and dev extras (`make test`)
#   scripts/setup.sh demo   only what the main job runs: .venv with the pipeline extra, no system
#                           packages (`make demo`; the pipeline calls none of them)
#   scripts/setup.sh gpu    everything, then ONNX Runtime's GPU build in place of the CPU one (the
#                           edge-gpu extra: CUDA and TensorRT execution providers; a GPU machine
#                           with its NVIDIA driver; the gpu-marked tests then run)
#
# Safe to re-run: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-all}
case "$profile" in
  all) extras="pipeline,dev" ;;
  demo) extras="pipeline" ;;
  gpu) extras="pipeline,dev" ;;
  *) echo "setup: unknown profile '$profile' (all, demo or gpu)" >&2; exit 2 ;;
esac

APT_PACKAGES=(dicom3tools dcm2niix dcmtk postgresql orthanc orthanc-dicomweb prometheus chromium
  fonts-dejavu-core)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "$profile" != demo ] && ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null; then python=$candidate; break; fi
  done
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# --no-compile: pip would byte-compile all ~38,000 installed modules up front, on one core; Python
# compiles the few thousand the project imports on first use instead.
# torch is pinned to the CPU wheel that the build machines keep on disk: an unpinned torch pulls a
# multi-GB CUDA build. On a GPU workstation install the CUDA wheel of the same version first.
.venv/bin/python -m pip install -q --no-compile "torch==2.13.0"
.venv/bin/python -m pip install -q --no-compile -e ".[$extras]"
if [ "$profile" = gpu ]; then
  # the two builds share the `onnxruntime` module: remove the CPU one, then install the GPU one
  # alone (the project's onnxruntime requirement is then met by its files, not its name)
  .venv/bin/python -m pip uninstall -q -y onnxruntime onnxruntime-gpu
  .venv/bin/python -m pip install -q --no-compile --no-deps \
    "$(.venv/bin/python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["edge-gpu"][0])')"
  .venv/bin/python -c 'import onnxruntime as o; print("setup: onnxruntime providers:", o.get_available_providers())'
fi
echo "setup: environment ($profile) ready in .venv ($(.venv/bin/python --version))"
