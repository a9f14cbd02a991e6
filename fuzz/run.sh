#!/usr/bin/env bash
# Runs libFuzzer / atheris targets: fuzz/run.sh BUILD_DIR SECONDS RUNS TARGET... Each target stops after
# RUNS executions (0: no count) or SECONDS, whichever comes first.
# Each target starts from a copy of its committed seeds (fuzz/corpus/<target>) plus what earlier runs
# in BUILD_DIR found; a crash, hang, leak, out-of-memory or sanitizer report stops the run with the
# input saved under BUILD_DIR/artifacts/<target>/. Prints executions and executions/s per target.
set -euo pipefail
build=$1 seconds=$2 runs=$3
shift 3
here="$(cd "$(dirname "$0")" && pwd)"
status=0
summary=""
for target in "$@"; do
  work="$build/corpus/$target" artifacts="$build/artifacts/$target"
  mkdir -p "$work" "$artifacts"
  extra=()
  [[ $target == fuzz_config ]] && extra+=(-dict="$here/config.dict")
  [[ $target == fuzz_server ]] && extra+=(-dict="$here/server.dict")
  # C++ targets are libFuzzer binaries in BUILD_DIR/fuzz; Python ones (atheris) run under $PYTHON.
  if [[ -f "$here/$target.py" ]]; then cmd=("${PYTHON:-python3}" "$here/$target.py"); else cmd=("$build/fuzz/$target"); fi
  log="$build/$target.log"
  echo "== $target: $seconds s (log $log)"
  # -timeout: one input taking 10 s is a hang; -rss_limit_mb / -malloc_limit_mb: a 2 GiB allocation is a finding.
  if ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
      "${cmd[@]}" -max_total_time="$seconds" -runs="$((runs > 0 ? runs : -1))" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="$artifacts/" "${extra[@]}" "$work" "$here/corpus/$target" >"$log" 2>&1; then
    result=ok
  else
    result="FAILED (see $log, input in $artifacts/)"
    status=1
    grep -m1 -A12 -E "ERROR|runtime error|deadly signal|Test unit written" "$log" || tail -20 "$log"
  fi
  executed=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  line="$target: ${executed:-?} executions, ${rate:-?} exec/s, $result"
  echo "$line"
  summary+="$line"$'\n'
done
echo "== fuzz summary (at most $seconds s$( ((runs > 0)) && echo " or $runs executions") per target)"
printf '%s' "$summary"
exit $status
