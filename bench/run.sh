#!/usr/bin/env bash
# The benchmark's one entry point (`make bench` runs it).
#
#   bash bench/run.sh                      # full run, about 10-15 minutes
#   bash bench/run.sh --quick              # short runs, for iterating
#   bash bench/run.sh --targets bare,sluicegate
#   bash bench/run.sh --soak 600           # ten minutes of steady load, RSS every 10 s
#   bash bench/run.sh --help               # every option
#
# Installs what it needs on a fresh Debian machine (wrk and nginx from apt; LiteLLM into
# its own virtualenv bench/.venv-litellm), then runs bench/harness.py with the project's
# virtualenv. Writes bench/results.json and BENCHMARKS.md. Every process it starts is
# stopped on exit, also on Ctrl-C or an error.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
out="$here/out"
pid_file="$out/pids"
litellm_venv="$here/.venv-litellm"
# The requirements live in the project's shared folder beside the repository.
litellm_reqs="${BENCH_LITELLM_REQUIREMENTS:-$repo/../shared/bench/litellm-requirements.txt}"
python_bin="${BENCH_PYTHON:-python3.11}"

die() { echo "bench: error: $*" >&2; exit 2; }
say() { echo "bench: $*" >&2; }

wants() {  # wants TARGET: is TARGET part of this run (default: all)?
    local list=""
    local prev=""
    for a in "${args[@]}"; do
        [[ "$prev" == "--targets" ]] && list="$a"
        [[ "$a" == --targets=* ]] && list="${a#--targets=}"
        prev="$a"
    done
    if [[ -z "$list" ]]; then
        # A soak defaults to sluicegate alone; a benchmark run to every target.
        for a in "${args[@]}"; do [[ "$a" == --soak* ]] && [[ "$1" != sluicegate ]] && return 1; done
        return 0
    fi
    [[ ",$list," == *",$1,"* ]]
}

args=("$@")
for a in "${args[@]}"; do
    if [[ "$a" == "-h" || "$a" == "--help" ]]; then
        exec "$repo/.venv/bin/python" "$here/harness.py" --help
    fi
done

# ---------------------------------------------------------------- cleanup on any exit
harness_pid=""
own_lock=""
# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() {
    local code=$?
    trap - EXIT INT TERM
    if [[ -n "$harness_pid" ]] && kill -0 "$harness_pid" 2>/dev/null; then
        kill -TERM "$harness_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$harness_pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$harness_pid" 2>/dev/null || true
    fi
    # Last resort: process groups the harness started and did not stop (it removes the
    # ones it stopped). Each line is "PID NAME"; every group was started as its own session.
    if [[ -n "$own_lock" && -s "$pid_file" ]]; then
        while read -r pid name; do
            [[ "$pid" =~ ^[0-9]+$ ]] || continue
            if kill -0 -- "-$pid" 2>/dev/null; then
                say "stopping leftover $name (process group $pid)"
                kill -TERM -- "-$pid" 2>/dev/null || true
                sleep 1
                kill -KILL -- "-$pid" 2>/dev/null || true
            fi
        done < "$pid_file"
        : > "$pid_file"
    fi
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- prerequisites
[[ -x "$repo/.venv/bin/python" ]] || die "$repo/.venv is missing: run 'make install' first"
command -v taskset >/dev/null || die "taskset is missing (apt-get install util-linux)"

apt_packages=()
command -v wrk >/dev/null || apt_packages+=(wrk)
if wants nginx && ! command -v nginx >/dev/null && [[ ! -x /usr/sbin/nginx ]]; then
    apt_packages+=(nginx)
fi
if ((${#apt_packages[@]})); then
    [[ $(id -u) -eq 0 ]] || die "need ${apt_packages[*]}: run as root or apt-get install them"
    say "installing ${apt_packages[*]} from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    # nginx's package starts its own service on port 80 where services may start; the
    # benchmark runs its own nginx on its own port and leaves that service alone.
    apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null \
        || die "apt-get install ${apt_packages[*]} failed"
fi
export PATH="$PATH:/usr/sbin:/sbin"

if wants litellm; then
    stamp="$litellm_venv/.installed"
    if [[ ! -f "$stamp" || "$litellm_reqs" -nt "$stamp" ]]; then
        [[ -f "$litellm_reqs" ]] || die "LiteLLM requirements not found at $litellm_reqs
(set BENCH_LITELLM_REQUIREMENTS, or leave litellm out with --targets)"
        command -v "$python_bin" >/dev/null || python_bin=python3
        say "installing LiteLLM into $litellm_venv (once; takes a few minutes)"
        rm -rf "$litellm_venv"
        "$python_bin" -m venv "$litellm_venv" || die "cannot create $litellm_venv"
        "$litellm_venv/bin/pip" install -q --upgrade pip >/dev/null
        # Installed from the requirements file and not as litellm[proxy]: the file says why.
        "$litellm_venv/bin/pip" install -q -r "$litellm_reqs" \
            || die "pip install -r $litellm_reqs failed"
        touch "$stamp"
    fi
fi

# ---------------------------------------------------------------- run
mkdir -p "$out"
# One run at a time: a second one would fight over the ports and the CPUs.
exec 9>"$out/lock"
flock -n 9 || die "another benchmark run is in progress (lock $out/lock)"
own_lock=1
: > "$pid_file"
export BENCH_PID_FILE="$pid_file"
cd "$repo"
"$repo/.venv/bin/python" "$here/harness.py" --command "bash bench/run.sh${*:+ $*}" "$@" &
harness_pid=$!
set +e
wait "$harness_pid"
code=$?
set -e
harness_pid=""
exit "$code"
