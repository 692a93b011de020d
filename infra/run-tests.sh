#!/usr/bin/env bash
# Start the real S3 server (Ceph RGW on 127.0.0.1), run pytest against it, stop exactly what was
# started. Usage: infra/run-tests.sh PYTHON [pytest args...]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="$1"; shift
export SVD_RAY_CEPH_DIR="${SVD_RAY_CEPH_DIR:-$(mktemp -d /tmp/svd-ray-ceph-XXXXXX)}"
bash "$here/ceph-rgw.sh" install
bash "$here/ceph-rgw.sh" start
trap 'bash "$here/ceph-rgw.sh" stop || true' EXIT
eval "$(bash "$here/ceph-rgw.sh" env)"
export SVD_RAY_REQUIRE_S3=1
"$py" -m pytest -q "$@"
