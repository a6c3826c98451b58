#!/bin/bash
# Run one cvmlab profile on this lab host: the profile's scenarios tagged
# tier:TIER, one avocado job per scenario file (each with its own variants),
# into results/lab-TIER/. Called by the lab CI templates after `make setup`.
#
#   ci/lab/run-profile.sh PROFILE TIER [PARALLEL]
#
# PROFILE is one of scenarios/profiles.yaml (smoke, full, qualification, stress); TIER is the
# runner's label (tcg, kvm, snp, tdx), or `any` for a profile that needs no
# particular host (kernels: it runs in the kernel-under-test lab) into
# results/lab-PROFILE/. Each job dir also gets `avocado-exit`
# (avocado's exit status) and `hostname`, which `cvmlab report` shows; the
# host's own report lands in results/lab-TIER/report/ (+ report.md).
# CVMLAB_LAB_RESULTS replaces `results` as the root.
# Exit status: 0 every job passed (or no scenario matched), 1 otherwise.
set -u
cd "$(dirname "$0")/../.."

profile=${1:?usage: ci/lab/run-profile.sh PROFILE TIER [PARALLEL]}
tier=${2:?usage: ci/lab/run-profile.sh PROFILE TIER [PARALLEL]}
parallel=${3:-2}
out=${CVMLAB_LAB_RESULTS:-results}/lab-$tier
tier_filter=(--tier "$tier")
if [ "$tier" = any ]; then
    out=${CVMLAB_LAB_RESULTS:-results}/lab-$profile
    tier_filter=()
fi
bin=.venv/bin
mkdir -p "$out"
# One avocado job per scenario file, filtered by the profile's tags and tier:TIER
# (scenarios/profiles.yaml); each job dir gets avocado-exit and hostname.
"$bin/cvmlab" profile run "$profile" "${tier_filter[@]}" --results "$out" --parallel "$parallel"
status=$?

# avocado's `latest` link would make artifact uploads carry the newest job twice.
rm -f "$out/latest"
shopt -s nullglob
jobs=("$out"/job-*)
# Lab-only profiles keep their evidence beside the jobs (results/lab-PROFILE/lab/).
if [ ${#jobs[@]} -eq 0 ]; then
    echo "run-profile: no scenario of profile $profile is tagged tier:$tier: nothing ran on this $tier host"
    exit $status
fi
"$bin/cvmlab" report "${jobs[@]}" -o "$out/report" --markdown "$out/report.md" || status=1
if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
    cat "$out/report.md" >> "$GITHUB_STEP_SUMMARY"
fi
exit $status
