# Sourced by scripts/test, tests/viem/run and tests/container/run: progress lines with the
# seconds since start, and steps with a bound, so a stuck step fails with its name instead of
# holding CI until its deadline.
#
#   SAY_PREFIX=name; . scripts/lib/bounded.sh
#   say "message"                     # "name [  12s] message" on the terminal's stderr
#   bounded SECS "what" CMD...        # run CMD (a program), at most SECS seconds

_bounded_t0=$SECONDS
exec 3>&2   # progress goes here even where a step's own output is redirected
say() { printf '%s [%4ss] %s\n' "${SAY_PREFIX:-run}" "$((SECONDS - _bounded_t0))" "$*" >&3; }

bounded() {
  local secs=$1 what=$2 rc=0 pid prev_int prev_term
  shift 2
  say "$what"
  prev_int=$(trap -p INT); prev_term=$(trap -p TERM)
  # timeout(1) runs CMD in a process group of its own, out of reach of the terminal's Ctrl-C:
  # pass INT and TERM on to that group, let it end, then fail the step.
  timeout -k 10 "$secs" "$@" &
  pid=$!
  trap 'kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null' INT TERM
  wait "$pid" || rc=$?
  if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then wait "$pid" 2>/dev/null || true; rc=130; fi
  eval "${prev_int:-trap - INT}"; eval "${prev_term:-trap - TERM}"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then say "$what: no end after ${secs}s"; fi
  return "$rc"
}
