#!/usr/bin/env bash
# Build (or bring up to date) the local virtualenv of one runtime env from its lock.
#
#   runtime_envs/build_venv.sh {ingress|belle2|whisperx} [VENV_DIR]
#
# Idempotent: a venv whose stamp matches the lock's hash is left alone.
# Every env gets the same interpreter (Ray needs one Python version across a cluster).
# belle2: where /opt/wheels holds the CPU torch wheel of the locked version, that wheel
# replaces PyPI's CUDA build and the CUDA-only packages of the lock are left out.
set -euo pipefail
env_name=${1:?usage: build_venv.sh ENV [VENV_DIR]}
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
venv=${2:-$root/.venvs/$env_name}
lock=$here/$env_name/requirements.lock
[ -f "$lock" ] || { echo "no lock for env '$env_name': $lock" >&2; exit 2; }
python=${KLIPNOTE_PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}
wheels=${KLIPNOTE_WHEELS:-/opt/wheels}

effective_lock=$(mktemp)
trap 'rm -f "$effective_lock"' EXIT
find_links=()
torch_pin=$(grep -E '^torch==' "$lock" | sed -E 's/^torch==([^ ]+).*/\1/' || true)
if [ "$env_name" = belle2 ] && [ -n "$torch_pin" ] && ls "$wheels"/torch-"$torch_pin"+cpu-*.whl >/dev/null 2>&1; then
    grep -v -E '^(cuda-|nvidia-|triton==)' "$lock" | sed -E "s/^torch==$torch_pin /torch==$torch_pin+cpu /" >"$effective_lock"
    find_links=(--find-links "$wheels")
    echo "[$env_name] using the CPU torch wheel from $wheels"
else
    cp "$lock" "$effective_lock"
fi

stamp="$venv/.klipnote-lock.sha256"
want=$( (sha256sum "$effective_lock" | cut -d' ' -f1; "$python" --version) | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
    echo "[$env_name] up to date: $venv"
    exit 0
fi
echo "[$env_name] building $venv from $lock"
uv venv --quiet --allow-existing --python "$python" "$venv"
uv pip sync --quiet --python "$venv/bin/python" --index-url https://pypi.org/simple \
    "${find_links[@]}" "$effective_lock"
echo "$want" >"$stamp"
echo "[$env_name] ready: $venv"
