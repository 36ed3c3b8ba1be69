#!/bin/bash
# Runs a benchmark command with every background job of this machine (nice 19 or SCHED_IDLE
# processes, also those started meanwhile) frozen, and resumes them after. On a shared 2-core
# machine even a nice-19 job halves a 2-thread torch step (benchmarks/RESULTS.md, "CPU speed,
# measured quiet"). Usage: benchmarks/quiet.sh embtables bench kernels ...
frozen=$(mktemp)
freeze() {
    ps -eo pid=,ni=,cls=,comm= | awk '($2 == 19 || $3 == "IDL") && $4 !~ /^(khugepaged|kworker)/ {print $1}' |
        while read -r pid; do kill -STOP "$pid" 2>/dev/null && echo "$pid" >> "$frozen"; done
}
freeze
( while true; do sleep 0.2; freeze; done ) &
watcher=$!
trap 'kill $watcher 2>/dev/null; wait $watcher 2>/dev/null; sort -u "$frozen" | xargs -r kill -CONT 2>/dev/null; rm -f "$frozen"' EXIT
sleep 0.5
"$@"
