#!/usr/bin/env bash
# Installs Ray and this project the way every cluster node and the container image do.
#   bash cluster/install.sh head     the driver's node: Ray, the project, S3 and GCS clients, datasets (no vLLM)
#   bash cluster/install.sh gpu      a GPU worker: the same plus vLLM 0.32 (CUDA build, with its CUDA torch)
# PYTHON (default python3) picks the interpreter; DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
role="${1:?usage: install.sh head|gpu}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "$*"; else "$@"; fi; }
case "$role" in
  head) extras="s3,gcs,hf" ;;
  gpu) extras="s3,gcs,hf,vllm" ;;
  *) echo "install.sh: unknown role '$role' (head or gpu)" >&2; exit 2 ;;
esac
run "$python" -m pip install -q "ray[default,data]==2.60.0"
# one resolver call for every extra: the store clients pin fsspec, which datasets bounds too
run "$python" -m pip install -q -e "$here[$extras]"
