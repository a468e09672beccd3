"""The ZeroQ distillation loop of `zq distill`, written in PyTorch, for a side-by-side benchmark.

The ONNX model is run by a small eager interpreter (the ops of CNN classifiers), so PyTorch
executes exactly the graph zq executes. Same loss (per-sample, per-channel mean and unbiased
std at every BatchNormalization input, plus the input term), same projected Adam inside the
box, same plateau schedule. Prints one JSON line: seconds per iteration and the BN loss ratio
to Gaussian noise.

    python benches/zeroq_pytorch.py MODEL.onnx --iters 50 --batch 32 --threads 2
"""

import argparse
import json
import time

import numpy as np
import onnx
import onnx.numpy_helper
import torch
import torch.nn.functional as F


def attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class Interp:
    def __init__(self, path):
        m = onnx.load(path)
        self.g = m.graph
        self.init = {
            t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy())
            for t in self.g.initializer
        }
        self.input = self.g.input[0].name
        self.bn_inputs = [n.input[0] for n in self.g.node if n.op_type == "BatchNormalization"]
        self.bn = []
        for n in self.g.node:
            if n.op_type == "BatchNormalization":
                eps = attrs(n).get("epsilon", 1e-5)
                mean, var = self.init[n.input[3]], self.init[n.input[4]]
                self.bn.append((mean, torch.sqrt(var + eps), eps))

    def run(self, x):
        env = dict(self.init)
        env[self.input] = x
        taps = []
        for n in self.g.node:
            a = attrs(n)
            i = [env[k] if k else None for k in n.input]
            op = n.op_type
            if op == "BatchNormalization":
                taps.append(i[0])
            y = getattr(self, "op_" + op)(i, a)
            env[n.output[0]] = y
        return [env[o.name] for o in self.g.output], taps

    # --- ops -------------------------------------------------------------------------------
    def op_Conv(self, i, a):
        pads = a.get("pads", [0, 0, 0, 0])
        x = i[0]
        if pads[0] != pads[2] or pads[1] != pads[3]:
            x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
            pads = [0, 0, 0, 0]
        return F.conv2d(x, i[1], i[2] if len(i) > 2 else None, a.get("strides", 1),
                        (pads[0], pads[1]), a.get("dilations", 1), a.get("group", 1))

    def op_BatchNormalization(self, i, a):
        return F.batch_norm(i[0], i[3], i[4], i[1], i[2], False, 0.0, a.get("epsilon", 1e-5))

    def op_Relu(self, i, a):
        return F.relu(i[0])

    def op_Add(self, i, a):
        return i[0] + i[1]

    def op_Mul(self, i, a):
        return i[0] * i[1]

    def op_AveragePool(self, i, a):
        p = a.get("pads", [0, 0, 0, 0])
        return F.avg_pool2d(i[0], a["kernel_shape"], a.get("strides", 1), (p[0], p[1]),
                            bool(a.get("ceil_mode", 0)), not a.get("count_include_pad", 0) == 0)

    def op_GlobalAveragePool(self, i, a):
        return i[0].mean(dim=(2, 3), keepdim=True)

    def op_Gemm(self, i, a):
        w = i[1].t() if a.get("transB", 0) else i[1]
        y = i[0] @ w
        return y + i[2] if len(i) > 2 and i[2] is not None else y

    def op_Flatten(self, i, a):
        return torch.flatten(i[0], a.get("axis", 1))

    def op_Reshape(self, i, a):
        shape = [int(v) for v in i[1].tolist()]
        shape = [i[0].shape[k] if v == 0 else v for k, v in enumerate(shape)]
        return i[0].reshape(shape)

    def op_Pad(self, i, a):
        pads = [int(v) for v in i[1].tolist()]
        r = len(pads) // 2
        tp = []
        for d in reversed(range(r)):
            tp += [pads[d], pads[d + r]]
        value = float(i[2]) if len(i) > 2 and i[2] is not None else 0.0
        return F.pad(i[0], tp, value=value)

    def op_Slice(self, i, a):
        x = i[0]
        starts, ends = i[1].tolist(), i[2].tolist()
        axes = i[3].tolist() if len(i) > 3 and i[3] is not None else list(range(len(starts)))
        steps = i[4].tolist() if len(i) > 4 and i[4] is not None else [1] * len(starts)
        idx = [slice(None)] * x.dim()
        for s, e, ax, st in zip(starts, ends, axes, steps):
            n = x.shape[ax]
            s, e = max(min(s, n), -n), max(min(e, n), -n - 1)
            idx[ax] = slice(s, e, st)
        return x[tuple(idx)]

    def op_Shape(self, i, a):
        return torch.tensor(list(i[0].shape), dtype=torch.int64)

    def op_Gather(self, i, a):
        return torch.index_select(i[0], a.get("axis", 0), i[1].reshape(-1)).reshape(
            list(i[0].shape[: a.get("axis", 0)]) + list(i[1].shape))

    def op_Unsqueeze(self, i, a):
        axes = a.get("axes", None)
        axes = axes if axes is not None else i[1].tolist()
        y = i[0]
        for ax in sorted(axes):
            y = y.unsqueeze(ax)
        return y

    def op_Concat(self, i, a):
        return torch.cat(i, a["axis"])

    def op_Constant(self, i, a):
        return torch.from_numpy(onnx.numpy_helper.to_array(a["value"]).copy())

    def op_ConstantOfShape(self, i, a):
        v = onnx.numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
        return torch.full(i[0].tolist(), float(v.reshape(-1)[0]), dtype=torch.from_numpy(v).dtype)

    def op_Cast(self, i, a):
        to = {1: torch.float32, 7: torch.int64, 6: torch.int32}[a["to"]]
        return i[0].to(to)

    def op_Transpose(self, i, a):
        return i[0].permute(a["perm"])


def stats(x, eps):
    f = x.reshape(x.shape[0], x.shape[1], -1)
    m = f.mean(-1)
    s = torch.sqrt(f.var(-1, unbiased=True) + eps)
    return m, s


def bn_loss(model, taps):
    n = taps[0].shape[0]
    total = 0.0
    for t, (mean, std, eps) in zip(taps, model.bn):
        m, s = stats(t, eps)
        total = total + ((m - mean) ** 2).sum() / n + ((s - std) ** 2).sum() / n
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--mean", default="0.485,0.456,0.406")
    p.add_argument("--std", default="0.229,0.224,0.225")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Interp(a.model)
    shape = [a.batch] + [d.dim_value for d in model.g.input[0].type.tensor_type.shape.dim[1:]]
    mean = torch.tensor([float(v) for v in a.mean.split(",")]).reshape(1, -1, 1, 1)
    std = torch.tensor([float(v) for v in a.std.split(",")]).reshape(1, -1, 1, 1)
    lo, hi = torch.minimum(-mean / std, (1 - mean) / std), torch.maximum(-mean / std, (1 - mean) / std)
    x = torch.randn(shape)
    with torch.no_grad():
        noise = float(bn_loss(model, model.run(x)[1]))
        x = torch.maximum(torch.minimum(x, hi), lo)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=a.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=1e-4, patience=100)
    t = None
    for it in range(a.iters):
        opt.zero_grad()
        _, taps = model.run(x)
        l = bn_loss(model, taps)
        m, s = stats(x, 0.0)
        loss = l + (m ** 2).sum() / a.batch + ((s - 1) ** 2).sum() / a.batch
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, hi), lo))
        sched.step(loss.item())
        if it == 0:
            t = time.perf_counter()  # steady state: the first step warms up
    secs = time.perf_counter() - t if t is not None else 0.0
    with torch.no_grad():
        final = float(bn_loss(model, model.run(x)[1]))
    print(json.dumps({
        "engine": f"pytorch {torch.__version__}",
        "threads": a.threads,
        "iters": a.iters,
        "batch": a.batch,
        "seconds_per_iter": secs / max(a.iters - 1, 1),
        "bn_loss_final": final,
        "bn_loss_noise": noise,
        "ratio_to_noise": final / noise,
    }))


if __name__ == "__main__":
    main()
