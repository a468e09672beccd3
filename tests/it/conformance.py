"""Write ONNX's backend node tests for the given ops in the backend-test layout.

usage: python conformance.py OUTDIR OP[,OP...]

Every node test case (onnx.backend.test.case.node.collect_testcases) whose graph uses only the
listed op types is written as OUTDIR/<case>/model.onnx with test_data_set_0/input_<j>.pb and
output_<j>.pb, as ONNX's own test data stores them, plus OUTDIR/<case>/case.json naming the op
types, the opset and the graph's input and output names. OUTDIR/onnx_version holds the version
of the onnx package that generated them. Called by tests/it/conformance.rs.
"""

import json
import os
import sys
import warnings

import onnx
from onnx import TensorProto, numpy_helper
from onnx.backend.test.case.node import collect_testcases


def tensor(value, name):
    if isinstance(value, TensorProto):
        return value
    return numpy_helper.from_array(value, name)


def main():
    out, ops = sys.argv[1], set(sys.argv[2].split(","))
    os.makedirs(out, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    written = 0
    for case in cases:
        graph = case.model.graph
        types = sorted({n.op_type for n in graph.node})
        if not types or not set(types) <= ops:
            continue
        if not all(vi.type.HasField("tensor_type") for vi in list(graph.input) + list(graph.output)):
            continue
        d = os.path.join(out, case.name)
        data = os.path.join(d, "test_data_set_0")
        os.makedirs(data, exist_ok=True)
        with open(os.path.join(d, "model.onnx"), "wb") as f:
            f.write(case.model.SerializeToString())
        inputs, outputs = case.data_sets[0]
        for j, x in enumerate(inputs):
            with open(os.path.join(data, f"input_{j}.pb"), "wb") as f:
                f.write(tensor(x, graph.input[j].name).SerializeToString())
        for j, y in enumerate(outputs):
            with open(os.path.join(data, f"output_{j}.pb"), "wb") as f:
                f.write(tensor(y, graph.output[j].name).SerializeToString())
        opset = [o.version for o in case.model.opset_import if o.domain in ("", "ai.onnx")]
        meta = {
            "name": case.name,
            "ops": types,
            "opset": opset[0] if opset else None,
            "inputs": [vi.name for vi in graph.input][: len(inputs)],
            "outputs": [vi.name for vi in graph.output][: len(outputs)],
            "rtol": case.rtol,
            "atol": case.atol,
        }
        with open(os.path.join(d, "case.json"), "w") as f:
            json.dump(meta, f)
        written += 1
    with open(os.path.join(out, "onnx_version"), "w") as f:
        f.write(onnx.__version__)
    print(written)


if __name__ == "__main__":
    main()
