#!/usr/bin/env bash
# The README's low-bit table: the shared ResNet-20 (and ResNet-32 W4A4) quantized on 256 distilled
# images with --refine none|adaround|genie, judged by ONNX Runtime (ZQ_ORT_LIB) on the CIFAR-10
# test set. About an hour on 2 cores. From the project root: bash benches/low_bit_table.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${ZQ_ORT_LIB:?set ZQ_ORT_LIB to libonnxruntime.so}"
S=../shared/models
T=../shared/data/cifar10/test
OUT=${1:-target/bench-low-bit}
mkdir -p "$OUT"
cargo build --release --quiet
Z=target/release/zq
row() { # model data name flags...
  local m=$1 d=$2 name=$3; shift 3
  local t0=$SECONDS
  $Z quantize "$m" --data "$d" --holdout 0 -o "$OUT/$name.onnx" --json "$@" > "$OUT/$name.json"
  report "$name" "$t0"
}
row_holdout() { # as row, with the default held-out images choosing refined or round to nearest
  local m=$1 d=$2 name=$3; shift 3
  local t0=$SECONDS
  $Z quantize "$m" --data "$d" -o "$OUT/$name.onnx" --json "$@" > "$OUT/$name.json"
  report "$name" "$t0"
}
report() { # name start-seconds
  local name=$1 t0=$2
  printf '%-16s %5ss  %s\n' "$name" "$((SECONDS - t0))" "$($Z eval "$OUT/$name.onnx" --data $T --engine ort -q --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["top1"])')"
}
for m in resnet20 resnet32; do
  [ -f "$OUT/$m.d256.safetensors" ] || $Z distill $S/${m}_cifar10_bn.onnx --num 256 --iters 200 \
    --stats batch -o "$OUT/$m.d256.safetensors" -q
done
M=$S/resnet20_cifar10_bn.onnx; D=$OUT/resnet20.d256.safetensors
row $M $D w8a8_none
row $M $D w8a8_genie --refine genie --refine-iters 200
row_holdout $M $D w8a8_none_holdout
row_holdout $M $D w8a8_genie_holdout --refine genie
row $M $D w4a8_none --wbits 4
row $M $D w4a8_adaround --wbits 4 --refine adaround --refine-iters 200
row $M $D w4a8_genie --wbits 4 --refine genie
row $M $D w4a4_all_none --wbits 4 --abits 4 --abits-scope all
row $M $D w4a4_none --wbits 4 --abits 4
row $M $D w4a4_adaround --wbits 4 --abits 4 --refine adaround --refine-iters 200
row $M $D w4a4_genie --wbits 4 --abits 4 --refine genie
row $M $D w2a4_none --wbits 2 --abits 4
row $M $D w2a4_genie --wbits 2 --abits 4 --refine genie --refine-iters 200
row $M $D pareto_none --abits 4 --pareto --budget 280KB
row $M $D pareto_genie --abits 4 --pareto --budget 280KB --refine genie --refine-iters 200
# Under 45% of the all-8-bit bit-operations: weights alone, then weights and layer inputs.
row $M $D pareto_bops_w --pareto --bits 2,4,8 --bops-budget 1167869952
row $M $D pareto_bops_wa --pareto --bits 2,4,8 --bops-budget 1167869952 --pareto-abits 4,8
M=$S/resnet32_cifar10_bn.onnx; D=$OUT/resnet32.d256.safetensors
row $M $D r32_w4a4_none --wbits 4 --abits 4
row $M $D r32_w4a8_none --wbits 4
row $M $D r32_w4a8_genie --wbits 4 --refine genie
row $M $D r32_w4a4_genie --wbits 4 --abits 4 --refine genie
