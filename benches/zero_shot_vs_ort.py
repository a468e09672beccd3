"""zq's zero-shot W8A8 against ONNX Runtime's quantize_static, judged by ONNX Runtime.

Usage (from the repository root, after `cargo build --release`):

    python benches/zero_shot_vs_ort.py [--models resnet20,raw_affine,...] [--out docs/zero_shot.json]

Needs numpy, onnx, onnxruntime 1.32 and pillow, and ../shared (models and CIFAR-10 PNGs).
For every model it writes four predictions on the CIFAR-10 test images and compares each with
the FP32 model's, all run by ONNX Runtime (`zq eval --engine ort --compare`):

  fp32       the model itself (top-1 only; it is the reference)
  ort_noise  ORT quant_pre_process, then quantize_static W8A8 (QDQ, per-channel int8 weights, uint8 activations,
             MinMax) calibrated on 512 Gaussian-noise inputs: N(0, 1) in input space for
             ImageNet-normalised models, otherwise pixels N(0.5, 0.25) through the model's
             preprocessing
  ort_real   the same, calibrated on 512 real CIFAR-10 training images (../shared calib)
  zq         `zq quantize MODEL` with its defaults (no real data anywhere)

Models: the shared ResNet-20, ResNet-32 and EfficientNet-Lite1, and the ResNet-20 behind other
input conventions (fixtures/norm_variants/make.py builds them into a temporary folder).
EfficientNet-Lite1 has no CIFAR labels; its row is judged by agreement with FP32 on the first
--limit-large test images resized to 240x240.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def models(tmp):
    m = os.path.join(SHARED, "models")
    out = {
        "resnet20": (os.path.join(m, "resnet20_cifar10_bn.onnx"), IMAGENET),
        "resnet32": (os.path.join(m, "resnet32_cifar10_bn.onnx"), IMAGENET),
        "efficientnet_lite1": (os.path.join(m, "efficientnet_lite1_bn.onnx"), ([0.498], [0.502])),
    }
    subprocess.run([sys.executable, os.path.join(ROOT, "fixtures/norm_variants/make.py"),
                    out["resnet20"][0], tmp], check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(tmp, "variants.json")) as f:
        for name, v in json.load(f).items():
            out["resnet20_" + name] = (os.path.join(tmp, name + ".onnx"), (v["mean"], v["std"]))
    return out


def input_shape(path):
    t = onnx.load(path).graph.input[0]
    d = [x.dim_value for x in t.type.tensor_type.shape.dim]
    return t.name, d[1], d[2], d[3]


def normalise(px, mean, std, c):
    mean = np.array(mean * (c // len(mean)) if len(mean) == 1 else mean, np.float32)
    std = np.array(std * (c // len(std)) if len(std) == 1 else std, np.float32)
    return (px - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)


def real_images(n, c, h, w):
    root = os.path.join(SHARED, "data/cifar10/calib")
    files = sorted(os.path.join(root, k, f) for k in sorted(os.listdir(root))
                   for f in sorted(os.listdir(os.path.join(root, k))))
    idx = np.linspace(0, len(files) - 1, n).round().astype(int)
    out = []
    for i in idx:
        im = Image.open(files[i]).convert("L" if c == 1 else "RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.BILINEAR)
        a = np.asarray(im, np.float32) / 255.0
        out.append(a[None] if c == 1 else a.transpose(2, 0, 1))
    return np.stack(out)


class Reader(CalibrationDataReader):
    def __init__(self, name, x, batch=32):
        self.it = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.it, None)


def ort_quantize(src, dst, name, x):
    # ORT's recommended flow: its pre-processing (shape inference, graph optimisation that folds
    # BatchNormalization into the convolutions) before quantize_static.
    pre = dst + ".pre.onnx"
    quant_pre_process(src, pre, skip_symbolic_shape=True)
    quantize_static(pre, dst, Reader(name, x), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def zq_eval(zq, model, ref, pre, limit, lib):
    mean, std = pre
    cmd = [zq, "eval", model, "--data", os.path.join(SHARED, "data/cifar10/test"),
           "--mean", ",".join(map(str, mean)), "--std", ",".join(map(str, std)),
           "--engine", "ort", "--ort-lib", lib, "--json", "-q"]
    if ref:
        cmd += ["--compare", ref]
    if limit:
        cmd += ["--limit", str(limit)]
    j = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {"top1": j.get("top1"), "agreement": j.get("agreement")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zq", default=os.path.join(ROOT, "target/release/zq"))
    ap.add_argument("--models", default="")
    ap.add_argument("--limit-large", type=int, default=2000)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    import onnxruntime
    lib = os.environ.get("ZQ_ORT_LIB") or sorted(
        __import__("glob").glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi",
                                             "libonnxruntime.so.*")))[0]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        ms = models(tmp)
        names = a.models.split(",") if a.models else list(ms)
        for key in names:
            path, pre = ms[key]
            name, c, h, w = input_shape(path)
            limit = a.limit_large if h * w > 64 * 64 else None
            rng = np.random.default_rng(0)
            if pre == IMAGENET:
                noise = rng.standard_normal((512, c, h, w), dtype=np.float32)
            else:
                noise = normalise(0.5 + 0.25 * rng.standard_normal((512, c, h, w), dtype=np.float32),
                                  *pre, c)
            real = normalise(real_images(512, c, h, w), *pre, c)
            r = {"fp32": zq_eval(a.zq, path, None, pre, limit, lib), "images": limit or 10000}
            for tag, x in (("ort_noise", noise), ("ort_real", real)):
                q = os.path.join(tmp, f"{key}.{tag}.onnx")
                ort_quantize(path, q, name, x)
                r[tag] = zq_eval(a.zq, q, path, pre, limit, lib)
            q = os.path.join(tmp, f"{key}.zq.onnx")
            t0 = time.time()
            o = subprocess.run([a.zq, "quantize", path, "-o", q, "--json", "-q",
                                "--mean", ",".join(map(str, pre[0])),
                                "--std", ",".join(map(str, pre[1]))],
                               check=True, capture_output=True, text=True)
            r["zq"] = zq_eval(a.zq, q, path, pre, limit, lib)
            r["zq"]["seconds"] = json.loads(o.stdout)["seconds"]
            r["zq"]["wall_seconds"] = time.time() - t0
            rows[key] = r
            print(key, json.dumps(r), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    print("| model | FP32 top-1 | ORT noise W8A8 agr. | ORT real W8A8 agr. | zq W8A8 agr. (top-1) | zq s |")
    print("|---|---|---|---|---|---|")
    for k, r in rows.items():
        f = lambda v: "-" if v is None else f"{100 * v:.2f}%"
        print(f"| {k} | {f(r['fp32']['top1'])} | {f(r['ort_noise']['agreement'])} | "
              f"{f(r['ort_real']['agreement'])} | {f(r['zq']['agreement'])} ({f(r['zq']['top1'])}) | "
              f"{r['zq']['seconds']:.0f} |")


if __name__ == "__main__":
    main()
