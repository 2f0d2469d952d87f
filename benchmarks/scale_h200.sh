#!/usr/bin/env bash
# benchmarks/scale.py in one call on the one-GPU H200 kind (see the device README): GPTQ 8B-shaped
# at 128×512 beside llm-compressor, 512×2048 on wiki + Austen's training novels, two 70B-shaped
# blocks (the 70B/405B extrapolation), one profiled block, AWQ+GPTQ and SmoothQuant W8A8 while the
# --budget-s lasts. Results come back as $OUT/scale.json (commit it as benchmarks/results/scale.json,
# then `python benchmarks/scale.py --report-only`).
#
#   bash benchmarks/scale_h200.sh prepare /work/main/.carry-scale2   # here: code, wheels, texts, tokenizer
#   run(carry=[".carry-scale2"], kind="nvidia-h200", timeout_s=380,
#       command="bash .carry-scale2/code/benchmarks/scale_h200.sh run")
#
# The carry folder: code/ (compressor/, benchmarks/), whl/ (llmcompressor 0.14.0.1, compressed-tensors
# 0.19.0, auto-round, datasets, dill, multiprocess, loguru, pydantic and its dependencies: not on the
# machine), cache/ (the wiki and Austen texts and their token streams, as the compressor cache holds
# them), tokenizer/ (the reference tokenizer, for the synthetic checkpoints).
set -u
case "${1:-run}" in
prepare)
  D=${2:?destination folder}
  HERE=$(cd "$(dirname "$0")/.." && pwd)
  CACHE=${COMPRESSOR_CACHE:-$HOME/.cache/compressor}
  WHEELS=${WHEELS:-/work/main/.carry-scale/.whl}
  rm -rf "$D" && mkdir -p "$D/code" "$D/whl" "$D/cache/data" "$D/tokenizer"
  cp -r "$HERE/compressor" "$HERE/benchmarks" "$HERE/pyproject.toml" "$D/code/"
  find "$D/code" -name __pycache__ -prune -exec rm -rf {} +
  cp "$WHEELS"/*.whl "$D/whl/"
  cp -r "$CACHE/data/wiki" "$CACHE/data/austen" "$D/cache/data/"
  [ -d "$CACHE/tokens" ] && cp -r "$CACHE/tokens" "$D/cache/"
  cp "$CACHE"/models/smollm2-135m/{tokenizer.json,tokenizer_config.json,config.json} "$D/tokenizer/"
  cp "$CACHE"/models/smollm2-135m/chat_template.jinja "$D/tokenizer/" 2>/dev/null
  du -sh "$D" ;;
run)
  C=$PWD/.carry-scale2
  export PYTHONUNBUFFERED=1 COMPRESSOR_CACHE=/tmp/cc PYTHONPATH=/tmp/site-scale:/tmp/code SCALE_TOKENIZER=$C/tokenizer
  rm -rf /tmp/code /tmp/cc /tmp/scale && cp -r "$C/code" /tmp/code && cp -r "$C/cache" /tmp/cc
  [ -d /tmp/site-scale ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site-scale "$C"/whl/*.whl || exit 3
  nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
  cd /tmp/code && python3 benchmarks/scale.py --device cuda --work /tmp/scale --results "$OUT/scale.json" \
      --budget-s "${BUDGET:-330}" ${SCALE_ARGS:-} 2>&1 | tee "$OUT/scale.log" | grep -v '^{"built"' | cut -c1-400 ;;
esac
