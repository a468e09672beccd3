#!/usr/bin/env bash
# Side-by-side benchmark of one ZeroQ distillation step (forward + backward + Adam, batch 32):
# zq (release build) and the same loop in PyTorch on 2 threads, in one run on one machine.
#
#   PYTHON=/path/to/python-with-torch-and-onnx benches/distill_vs_pytorch.sh [MODEL] [ITERS]
#
# MODEL defaults to ../shared/models/resnet20_cifar10_bn_sim.onnx; ITERS to 60.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-../shared/models/resnet20_cifar10_bn_sim.onnx}
ITERS=${2:-60}
PYTHON=${PYTHON:-python3}
cargo build --release --quiet
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Alternate the two engines twice so neither profits from a quieter moment of the machine.
for round in 1 2; do
  ./target/release/zq distill "$MODEL" --num 32 --batch 32 --iters "$ITERS" --schedule plateau -o "$tmp/d.safetensors" --json --quiet > "$tmp/zq$round.json"
  "$PYTHON" benches/zeroq_pytorch.py "$MODEL" --iters "$ITERS" --batch 32 --threads 2 > "$tmp/pt$round.json"
done
"$PYTHON" - "$tmp" "$MODEL" "$ITERS" <<'PY'
import json, sys
d, model, iters = sys.argv[1], sys.argv[2], sys.argv[3]
z = [json.load(open(f"{d}/zq{r}.json")) for r in (1, 2)]
p = [json.load(open(f"{d}/pt{r}.json")) for r in (1, 2)]
zs = min(x["seconds_per_iter"] for x in z)
ps = min(x["seconds_per_iter"] for x in p)
print(f"model {model}, batch 32, {iters} iterations, best of 2 rounds")
print(f"zq       {zs*1000:8.1f} ms/iter   BN loss / noise {z[0]['ratio_to_noise']:.4f}")
print(f"{p[0]['engine']:<8} {ps*1000:8.1f} ms/iter   BN loss / noise {p[0]['ratio_to_noise']:.4f}  ({p[0]['threads']} threads)")
print(f"ratio zq / pytorch: {zs/ps:.2f}")
PY
