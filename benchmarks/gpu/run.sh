#!/usr/bin/env bash
# The GPU checks of the vLLM path, as one prepared run on a GPU machine (the device tool's
# `run`, or any CUDA host): vLLM in its own virtualenv (it pins its own torch), the vLLM
# backend's tests (real engines: in-place swaps against fresh engines, genome swaps, sleep
# mode), then a two-generation campaign with `evaluation.backend.kind: vllm` timed against
# transformers on cuda. Results under $OUT (default ./gpu-results).
#
#   bash benchmarks/gpu/run.sh                  # needs network for pip, or wheels in .whl/
#   DATA=../shared/data DB_URL=mysql://root@127.0.0.1:3306 bash benchmarks/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || { echo "no GPU here"; exit 1; }

VENV=.venv-gpu
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$VENV/bin/pip" install -q --no-index --find-links .whl 'vllm==0.33.*' -e '.[dev]'
    else
        "$VENV/bin/pip" install -q 'vllm==0.33.*' -e '.[dev]'
    fi || { echo "could not install vLLM 0.33 (no network and no wheels in .whl/)"; exit 1; }
fi
PY="$VENV/bin/python"
"$PY" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" \
    | tee "$OUT/versions.txt"

"$PY" -m pytest -q -rs tests/generate/test_vllm_backend.py -p no:cacheprovider 2>&1 \
    | tee "$OUT/vllm_tests.log"
tests=$?

"$PY" benchmarks/gpu/vllm_campaign.py --out "$OUT" ${MODEL:+--model "$MODEL"} \
    ${DATA:+--data "$DATA"} ${DB_URL:+--db-url "$DB_URL"} 2>&1 | tee "$OUT/vllm_campaign.log"
campaign=$?
echo "tests exit $tests, campaign exit $campaign" | tee "$OUT/summary.txt"
exit $(( tests || campaign ))
