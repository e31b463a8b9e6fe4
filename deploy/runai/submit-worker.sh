#!/usr/bin/env bash
# Submits one sleap-rtc GPU worker to a Run:ai cluster (the v1 CLI's `runai submit`; README.md
# beside this file has the newer CLI's spelling). Everything is set by environment variables:
#
#   RUNAI_PROJECT=lab SLEAP_RTC_SERVER=https://rtc.example.org deploy/runai/submit-worker.sh
#   DRY_RUN=1 ... deploy/runai/submit-worker.sh     # print the command instead of running it
#
# Before the first run (once per project namespace, e.g. runai-lab):
#   kubectl -n runai-lab create secret generic sleap-rtc-worker --from-literal=token=slp_...
#   kubectl -n runai-lab apply -f deploy/k8s/worker/pvc.yaml
set -euo pipefail

: "${RUNAI_PROJECT:?set RUNAI_PROJECT to your Run:ai project}"
: "${SLEAP_RTC_SERVER:?set SLEAP_RTC_SERVER to the signaling server URL}"
NAME="${NAME:-sleap-rtc-worker}"
IMAGE="${IMAGE:-registry.example.org/sleap-rtc-worker:0.1.0}"
# The Secret holding the worker token (key `token`), made as above.
TOKEN_SECRET="${TOKEN_SECRET:-sleap-rtc-worker}"
# An existing claim with the datasets, mounted read-only at DATA_PATH (which jobs may then name
# by absolute path), and the claim for the work dir (uploads, results, caches).
DATA_PVC="${DATA_PVC:-sleap-datasets}"
DATA_PATH="${DATA_PATH:-/data/lab}"
WORK_PVC="${WORK_PVC:-sleap-rtc-worker-work}"
GPUS="${GPUS:-1}"

cmd=(
  runai submit "$NAME"
  --project "$RUNAI_PROJECT"
  --image "$IMAGE"
  --gpu "$GPUS"
  # A worker is a service that waits for jobs: interactive workloads are not preempted, so a
  # running training is not killed to make room. Drop it to run on idle GPUs only.
  --interactive
  --environment "SLEAP_RTC_SERVER=$SLEAP_RTC_SERVER"
  --environment "SLEAP_RTC_TOKEN=SECRET:$TOKEN_SECRET,token"
  --environment "SLEAP_RTC_MOUNTS=$DATA_PATH"
  --environment "SLEAP_RTC_WORK_DIR=/var/lib/sleap-rtc/work"
  --pvc "$DATA_PVC:$DATA_PATH:ro"
  --pvc "$WORK_PVC:/var/lib/sleap-rtc"
  # PyTorch's data loader needs more than the default 64 MiB of /dev/shm.
  --large-shm
)

if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
