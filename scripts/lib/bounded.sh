# Sourced by scripts/test, tests/viem/run and tests/container/run: progress lines with the
# seconds since start, and steps with a bound, so a stuck step fails with its name instead of
# holding CI until its deadline.
#
#   SAY_PREFIX=name; . scripts/lib/bounded.sh
#   say "message"                     # "name [  12s] message" on the terminal's stderr
#   bounded SECS "what" CMD...        # run CMD (a program), at most SECS seconds
#
# BOUNDED_DEADLINE (seconds since the epoch, exported by scripts/test): no step runs past it,
# whatever its own bound, so the whole run ends inside CI's limit.

_bounded_t0=$SECONDS
exec 3>&2   # progress goes here even where a step's own output is redirected
say() { printf '%s [%4ss] %s\n' "${SAY_PREFIX:-run}" "$((SECONDS - _bounded_t0))" "$*" >&3; }

bounded() {
  local secs=$1 what=$2 rc=0 pid prev_int prev_term left
  shift 2
  if [ -n "${BOUNDED_DEADLINE:-}" ]; then
    left=$((BOUNDED_DEADLINE - $(date +%s)))
    if [ "$left" -le 0 ]; then say "$what: no time left in the run's budget"; return 124; fi
    [ "$left" -lt "$secs" ] && secs=$left
  fi
  say "$what"
  prev_int=$(trap -p INT); prev_term=$(trap -p TERM)
  _bounded_interrupted=
  # timeout(1) runs CMD in a process group of its own, out of reach of the terminal's Ctrl-C:
  # pass INT and TERM on to that group, let it end, then end this script too. fd 3 is not
  # handed on: a process that outlived its step would hold the caller's pipe open.
  timeout -k 30 "$secs" "$@" 3>&- &
  pid=$!
  trap '_bounded_interrupted=1; kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null' INT TERM
  wait "$pid" || rc=$?
  if [ -n "$_bounded_interrupted" ]; then
    wait "$pid" 2>/dev/null || true
    eval "${prev_int:-trap - INT}"; eval "${prev_term:-trap - TERM}"
    say "$what: interrupted"
    exit 130
  fi
  eval "${prev_int:-trap - INT}"; eval "${prev_term:-trap - TERM}"
  if [ "$rc" = 124 ]; then say "$what: no end after ${secs}s"; fi
  return "$rc"
}
