#!/bin/bash
# Merge every host's avocado jobs (results/lab-*/job-*, as the tier jobs'
# artifacts unpack) into one cvmlab report: the lab's qualification matrix.
#
#   ci/lab/merge-report.sh [OUT]        (default OUT: results/lab-report)
#
# CVMLAB_LAB_RESULTS replaces `results` as the root the job dirs are under.
# Markdown goes to OUT/summary.md and, on GitHub, to $GITHUB_STEP_SUMMARY.
# With CVMLAB_BASELINE set (a previous report.json or report dir), the
# comparison is added (OUT/compare.html) and a regression fails the job.
set -u
cd "$(dirname "$0")/../.."

root=${CVMLAB_LAB_RESULTS:-results}
out=${1:-$root/lab-report}
shopt -s nullglob
jobs=("$root"/lab-*/job-*)
if [ ${#jobs[@]} -eq 0 ]; then
    echo "merge-report: no job dirs under $root/lab-*/: did any tier job run a scenario?" >&2
    exit 1
fi
args=(report "${jobs[@]}" -o "$out" --markdown "$out/summary.md")
if [ -n "${CVMLAB_BASELINE:-}" ]; then
    args+=(--compare "$CVMLAB_BASELINE" "$out" --fail-on-regression)
fi
.venv/bin/cvmlab "${args[@]}"
status=$?
if [ -n "${GITHUB_STEP_SUMMARY:-}" ] && [ -f "$out/summary.md" ]; then
    cat "$out/summary.md" >> "$GITHUB_STEP_SUMMARY"
fi
exit $status
