#!/usr/bin/env bash
# The GPU check on the GPU host's own stack (README "GPU check"; bench/gpu_check.py says what it
# runs). Needs the bundle bench/gpu_check_bundle.py packs (`make gpu-check-bundle`), carried to
# the host as .gpu-check/; its wheels are installed into a temporary directory first where the
# interpreter lacks pydantic or OpenCC (the host's image lacks both).
# Arguments go to bench/gpu_check.py. PYTHON picks the interpreter (default: python3).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bundle=${GPU_CHECK_BUNDLE:-$root/.gpu-check}
py=${PYTHON:-python3}
if [ ! -f "$bundle/clips.npz" ]; then
    echo "No GPU-check bundle at $bundle: run 'make gpu-check-bundle' where the venvs are, and carry .gpu-check." >&2
    exit 2
fi
if ! "$py" -c "import pydantic, opencc" 2>/dev/null && compgen -G "$bundle/wheels/*.whl" >/dev/null; then
    site=$(mktemp -d /tmp/gpu-check-site.XXXXXX)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$bundle"/wheels/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$py" "$root/bench/gpu_check.py" --bundle "$bundle" "$@"
