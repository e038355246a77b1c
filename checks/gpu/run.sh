#!/bin/bash
# The GPU plan that stop 28 could not run (no device machine was lent): one device call, about 7 minutes.
#   1. checks/gpu/decode_variants.py: compiled static decode of demo:llama-1b at 8K, batch 1, with SDPA as
#      transformers calls it (repeat_kv + mask) against GQA packed into the query rows (SDPA, and plain
#      matmul-softmax-matmul under compile); prefill, decode ms/token, steady-state decode, % of the floor,
#      GPU kernel time per kernel (issue 22: where compiled decode spends its time).
#   2. checks/gpu/handwritten_wide.py: tests/models/graph_styles.py's _wide models, eager against the swap,
#      at S 1024 and 4096 with peak memory and the profile of each (issue 21's table).
#   3. --train through flex_attention on a GPU (issue 21: gradients of the fused path against float64).
# Run from the repository root on the device: bash checks/gpu/run.sh (writes under $OUT).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
(PLAN=${DPLAN:-"sdpa:own:1,gqa_sdpa:own:1,gqa_math:own:1"} timeout ${T1:-200} python checks/gpu/decode_variants.py > $OUT/decode.log 2>&1; echo decode rc $? >> $OUT/decode.log)
PLAN=${WPLAN:-"alibiarange:flex_attention:1024,alibiarange:flex_attention:4096,causalarange:sdpa:4096,softcapalibi:flex_attention:4096,biasloop:flex_attention:4096,causalarange:sdpa:1024,biasloop:flex_attention:1024,softcapalibi:flex_attention:1024,differential:sdpa:4096"} timeout ${T2:-150} python checks/gpu/handwritten_wide.py > $OUT/wide.log 2>&1; echo wide rc $?
timeout ${T3:-60} python scripts/enable_flash.py --model tests/models/graph_styles.py:build_softcapalibi --backend flex_attention --train --device cuda --dtype bfloat16 --seq-len 256 --batch-size 2 --json --no-report --min-run-time 0.2 > $OUT/train_flex.json 2> $OUT/train_flex.err; echo train rc $?
grep -v "^    (" $OUT/decode.log | grep -v Warning | tail -24; grep "^{" $OUT/wide.log | cut -c1-400
python -c "
import json; d=json.load(open('$OUT/train_flex.json')); print(d['status'], d['summary'][:300]); [print(c['name'], c['passed'], c['evidence'][:200]) for c in d['checks']]" 2>&1 | tail -8

