# Process bookkeeping shared by hack/control-plane.sh and hack/node.sh (sourced): every process
# a script starts is recorded as "PID START_TIME" in DIR/NAME.pid, so a later stop never hits a
# recycled PID.
# shellcheck shell=bash

# proc_start_time PID: the kernel start time of PID (field 22 of /proc/PID/stat), to tell a
# live process from a recycled PID.
proc_start_time() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    # After "comm) ", field 3 is at index 0, so field 22 is at index 19.
    local -a f
    read -r -a f <<<"$stat"
    printf '%s\n' "${f[19]}"
}

# recorded_pid DIR NAME: print the PID recorded in DIR/NAME.pid if that process is still the one
# we started (same PID and kernel start time, so a recycled PID is never hit).
recorded_pid() {
    local pid start now
    [[ -f "$1/$2.pid" ]] || return 1
    read -r pid start <"$1/$2.pid" || true
    [[ -n "${pid:-}" ]] || return 1
    now="$(proc_start_time "$pid" 2>/dev/null)" || return 1
    [[ "$now" == "${start:-}" ]] || return 1
    printf '%s\n' "$pid"
}

# kill_recorded DIR NAME...: stop the recorded processes, SIGTERM first (all at once), then
# SIGKILL whatever is still there after KILL_GRACE seconds (default 10), and wait for that to
# take effect.
kill_recorded() {
    local dir="$1" name pid
    shift
    local -a pids=()
    for name in "$@"; do
        pid="$(recorded_pid "$dir" "$name")" || continue
        kill -TERM "$pid" 2>/dev/null && pids+=("$name")
    done
    mapfile -t pids < <(wait_gone "$dir" $((${KILL_GRACE:-10} * 10)) "${pids[@]}")
    for name in "${pids[@]}"; do
        pid="$(recorded_pid "$dir" "$name")" && kill -KILL "$pid" 2>/dev/null
    done
    # SIGKILL is not instant either: wait (up to 5 seconds) until they are gone.
    wait_gone "$dir" 50 "${pids[@]}" >/dev/null
    return 0
}

# wait_gone DIR TENTHS NAME...: wait up to TENTHS tenths of a second for the recorded processes
# to end; print the names of those still running.
wait_gone() {
    local dir="$1" tenths="$2" i name
    shift 2
    local -a left=("$@")
    for ((i = 0; i < tenths && ${#left[@]} > 0; i++)); do
        local -a running=()
        for name in "${left[@]}"; do
            recorded_pid "$dir" "$name" >/dev/null && running+=("$name")
        done
        left=("${running[@]}")
        ((${#left[@]} == 0)) || sleep 0.1
    done
    ((${#left[@]} == 0)) || printf '%s\n' "${left[@]}"
}

# record DIR NAME PID
record() {
    local st
    st="$(proc_start_time "$3")" || st=exited
    printf '%s %s\n' "$3" "$st" >"$1/$2.pid"
}

# start_bg DIR NAME CMD...: run CMD in its own session, output to DIR/NAME.log, recorded.
start_bg() {
    local dir="$1" name="$2"
    shift 2
    setsid "$@" </dev/null >>"$dir/$name.log" 2>&1 &
    record "$dir" "$name" "$!"
}

alive() { recorded_pid "$1" "$2" >/dev/null; } # DIR NAME
