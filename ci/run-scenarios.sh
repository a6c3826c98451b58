#!/bin/bash
# Run cvmlab's scenarios under `avocado run`: one job per scenario file,
# each with its own variants file, results under results/.
#
#   ci/run-scenarios.sh smoke|all [PARALLEL]
#
# "smoke" runs only tests tagged smoke. Jobs that measure host-wide memory
# counters serialise themselves on a host lock (orchestrator.host.hostlock).
set -u
cd "$(dirname "$0")/.."

profile=${1:-all}
parallel=${2:-2}
avocado=.venv/bin/avocado

# scenario file | variants file (- for none) | max parallel tasks ("P" = $parallel)
JOBS=(
    "scenarios/boot.py       scenarios/variants/backends.yaml  P"
    "scenarios/gmem_uapi.py  -                                 P"
    "scenarios/host_punch.py scenarios/variants/host_punch.yaml P"
)

status=0
ran=()
for entry in "${JOBS[@]}"; do
    read -r file variants tasks <<<"$entry"
    [ "$tasks" = P ] && tasks=$parallel
    args=("$file" --job-results-dir results --max-parallel-tasks "$tasks")
    if [ "$profile" = smoke ]; then
        grep -Eq ':avocado: tags=.*\bsmoke\b' "$file" || continue
        args+=(--filter-by-tags smoke)
    fi
    # References come before -m: `-m` takes several files and would eat them.
    [ "$variants" != - ] && args+=(-m "$variants")
    echo "== avocado run ${args[*]}"
    log=$(mktemp)
    "$avocado" run "${args[@]}" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    job=$(sed -n 's/^JOB LOG *: \(.*\)\/job\.log$/\1/p' "$log" | tail -n 1)
    rm -f "$log"
    ran+=("$(printf '%-26s exit %s  %s' "$file" "$rc" "${job:-<no job dir>}")")
    [ "$rc" -eq 0 ] || status=1
done

echo
echo "Results (avocado job dirs; results.html, results.json and per-test data/ inside):"
for line in "${ran[@]}"; do echo "  $line"; done
exit $status
