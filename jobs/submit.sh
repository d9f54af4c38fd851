#!/usr/bin/env bash
# Submit `instructdiff run CONFIG [args]` to a running Ray cluster as a Ray job.
#   RAY_ADDRESS=http://HEAD:8265 jobs/submit.sh jobs/math.yaml --set out=s3://BUCKET/run
# The job config travels in the working dir; the project itself must be installed on the nodes
# (cluster/*.yaml setup_commands, or the KubeRay image). Resubmitting the same command after a
# lost cluster resumes from the run directory.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 CONFIG.yaml [instructdiff run args...]" >&2; exit 2; }
config=$1; shift
dir=$(cd "$(dirname "$config")" && pwd)
exec ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir "$dir" \
  ${SUBMIT_ARGS:-} -- instructdiff run "$(basename "$config")" "$@"
