#!/usr/bin/env bash
# Heap allocations per request of the release service under one load of benches/http.rs
# (`session` or `sponsor`, its closed loop): uprobes on mimalloc's entry points
# (`mi_malloc_aligned`, which every Rust allocation goes through, and `mi_free`) counted by
# `perf stat` over 5 s of the load, against the requests the service answered meanwhile (its
# `sp_requests_total`). A count, not a time: the same from run to run within a few percent
# (how the ledger's calls group requests moves it), where CPU time on a shared machine moves by a
# tenth. The probes slow the service, so the load's own table is not the point here.
#
#   benches/allocations.sh session        # or sponsor; GRANTS as for the bench (default 20000)
#
# Needs root (uprobes), perf (Debian package linux-perf) and a release build of the bench
# (`cargo bench --bench http --no-run`); the probes are removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
load=${1:-session}
case "$load" in session | sponsor) ;; *) echo "usage: $0 session|sponsor" >&2; exit 2 ;; esac
command -v perf >/dev/null || { echo "$0: needs perf (Debian package linux-perf)" >&2; exit 1; }
bin=$PWD/target/release/session-paymaster
bench=$(ls -t target/release/deps/http-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
[ -x "$bin" ] && [ -n "$bench" ] || {
  echo "$0: build first: cargo bench --bench http --no-run" >&2
  exit 1
}
tmp=$(mktemp -d)
cleanup() {
  perf probe -q -d 'probe_session:*' 2>/dev/null || true
  # (On a failure, the bench and what it started: its service and redis-server.)
  if [ -n "${run:-}" ] && kill -0 "$run" 2>/dev/null; then
    pkill -P "$run" 2>/dev/null || true
    kill "$run" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
perf probe -q -d 'probe_session:*' 2>/dev/null || true
perf probe -q -x "$bin" --add mi_malloc_aligned
perf probe -q -x "$bin" --add mi_free
ONLY=$load SECS=12 "$bench" --bench >"$tmp/bench.log" 2>&1 &
run=$!
pid=""
for _ in $(seq 1 120); do
  sleep 1
  pid=$(pgrep -f "^$bin serve" | head -1 || true)
  [ -n "$pid" ] && { [ "$load" = sponsor ] || grep -q '^created' "$tmp/bench.log"; } && break
done
[ -n "$pid" ] || { echo "$0: the bench's service did not start" >&2; exit 1; }
sleep 3 # into the closed loop
port=$(tr '\0' ' ' </proc/"$pid"/cmdline | grep -o -- '--listen [0-9.]*:[0-9]*' | sed 's/.*://')
answered() {
  curl -s "http://127.0.0.1:$port/metrics" | awk '/^sp_requests_total/ {s += $2} END {printf "%d", s}'
}
before=$(answered)
perf stat -x, -e probe_session:mi_malloc_aligned,probe_session:mi_free -p "$pid" -- sleep 5 2>"$tmp/stat"
after=$(answered)
requests=$((after - before))
awk -F, -v n="$requests" -v load="$load" '
  /mi_malloc_aligned/ {a = $1} /mi_free/ {f = $1}
  END {printf "%s: %d requests answered in 5 s; per request %.1f allocations, %.1f frees\n", load, n, a / n, f / n}
' "$tmp/stat"
wait "$run" # the bench's other loads, which stop what it started
run=""
