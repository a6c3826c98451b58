#!/bin/bash
# Run one cvmlab profile on this lab host: the scenarios tagged PROFILE and
# tier:TIER, one avocado job per scenario file (each with its own variants),
# into results/lab-TIER/. Called by the lab CI templates after `make setup`.
#
#   ci/lab/run-profile.sh PROFILE TIER [PARALLEL]
#
# PROFILE is an avocado tag (smoke, full, qualification, stress); TIER is the
# runner's label (tcg, kvm, snp, tdx). Each job dir also gets `avocado-exit`
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
bin=.venv/bin
tags="$profile,tier:$tier"   # one --filter-by-tags value: both tags must be present

# scenario file | variants file (- for none) | max parallel tasks ("P" = $parallel).
# Keep in step with JOBS in ci/run-scenarios.sh.
JOBS=(
    "scenarios/boot.py               scenarios/variants/backends.yaml  P"
    "scenarios/gmem_uapi.py          -                                 P"
    "scenarios/conversion_driver.py  -                                 P"
)

mkdir -p "$out"
status=0
ran=0
for entry in "${JOBS[@]}"; do
    read -r file variants tasks <<<"$entry"
    [ "$tasks" = P ] && tasks=$parallel
    if [ ! -f "$file" ]; then
        echo "run-profile: $file does not exist here, skipped"
        continue
    fi
    if [ -z "$("$bin/avocado" list --filter-by-tags "$tags" "$file" 2>/dev/null)" ]; then
        echo "run-profile: no test in $file is tagged $tags"
        continue
    fi
    args=(run "$file" --job-results-dir "$out" --max-parallel-tasks "$tasks"
          --filter-by-tags "$tags")
    # References come before -m: `-m` takes several files and would eat them.
    [ "$variants" != - ] && args+=(-m "$variants")
    echo "== avocado ${args[*]}"
    log=$(mktemp)
    "$bin/avocado" "${args[@]}" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    job=$(sed -n 's/^JOB LOG *: \(.*\)\/job\.log$/\1/p' "$log" | tail -n 1)
    rm -f "$log"
    if [ -n "$job" ] && [ -d "$job" ]; then
        echo "$rc" > "$job/avocado-exit"
        hostname > "$job/hostname" 2>/dev/null || uname -n > "$job/hostname"
    fi
    ran=$((ran + 1))
    [ "$rc" -eq 0 ] || status=1
done

# avocado's `latest` link would make artifact uploads carry the newest job twice.
rm -f "$out/latest"
shopt -s nullglob
jobs=("$out"/job-*)
if [ "$ran" -eq 0 ] || [ ${#jobs[@]} -eq 0 ]; then
    echo "run-profile: no scenario is tagged $tags: nothing ran on this $tier host"
    exit $status
fi
"$bin/cvmlab" report "${jobs[@]}" -o "$out/report" --markdown "$out/report.md" || status=1
if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
    cat "$out/report.md" >> "$GITHUB_STEP_SUMMARY"
fi
exit $status
