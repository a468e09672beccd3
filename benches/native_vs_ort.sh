#!/usr/bin/env bash
# The README's native-engine speed table: zq's W8A8 and W4A8 copies of the shared ResNet-20,
# ResNet-32 and EfficientNet-Lite1, and the FP32 originals, timed by `zq bench --model` against
# ONNX Runtime (ZQ_ORT_LIB) at batch 1 and 64. Run on a quiet machine from the project root:
#   bash benches/native_vs_ort.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${ZQ_ORT_LIB:?set ZQ_ORT_LIB to libonnxruntime.so}"
S=../shared/models
D=../shared/data/cifar10/test
OUT=${1:-target/bench-native}
mkdir -p "$OUT"
cargo build --release --quiet
Z=target/release/zq
eff=(--mean 0.498 --std 0.502)
[ -f "$OUT/r20_w8a8.onnx" ] || $Z quantize $S/resnet20_cifar10_bn.onnx -o "$OUT/r20_w8a8.onnx" -q
[ -f "$OUT/r20_w4a8.onnx" ] || $Z quantize $S/resnet20_cifar10_bn.onnx --wbits 4 -o "$OUT/r20_w4a8.onnx" -q
[ -f "$OUT/r32_w8a8.onnx" ] || $Z quantize $S/resnet32_cifar10_bn.onnx -o "$OUT/r32_w8a8.onnx" -q
[ -f "$OUT/r32_w4a8.onnx" ] || $Z quantize $S/resnet32_cifar10_bn.onnx --wbits 4 -o "$OUT/r32_w4a8.onnx" -q
[ -f "$OUT/eff_w8a8.onnx" ] || $Z quantize $S/efficientnet_lite1_bn.onnx "${eff[@]}" -o "$OUT/eff_w8a8.onnx" -q
[ -f "$OUT/eff_w4a8.onnx" ] || $Z quantize $S/efficientnet_lite1_bn.onnx "${eff[@]}" --wbits 4 -o "$OUT/eff_w4a8.onnx" -q
for m in $S/resnet20_cifar10_bn.onnx "$OUT/r20_w8a8.onnx" "$OUT/r20_w4a8.onnx" \
         $S/resnet32_cifar10_bn.onnx "$OUT/r32_w8a8.onnx" "$OUT/r32_w4a8.onnx"; do
  $Z bench --model "$m" --data $D --batch 1,64 -q
done
for m in $S/efficientnet_lite1_bn.onnx "$OUT/eff_w8a8.onnx" "$OUT/eff_w4a8.onnx"; do
  $Z bench --model "$m" --data $D "${eff[@]}" --batch 1,64 -q
done
