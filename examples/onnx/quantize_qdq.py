#!/usr/bin/env python3
"""Activation-quantize a fixed-shape meo ONNX export for the QNN HTP (QDQ, static scales).

    meo export-onnx model.meo --task docs --weights channel --static-shape 4:256 -o model.onnx
    PYTHONPATH=.py python3 examples/onnx/quantize_qdq.py model.onnx model.qdq.onnx [--tokens FILE]

Calibration runs the float graph itself over token sequences (`--tokens`: one sequence of
whitespace-separated ids per line, the last one held out for the check when there are several;
default: seeded random ids), chunk by chunk with its own KV
cache, and feeds every call's inputs to ONNX Runtime's QNN QDQ configuration
(`get_qnn_qdq_config`, uint16 activations, uint8 weights). The attention mask path — the mask
`Where`s (their −1e30 entries) and every node from the masked scores to the attention-weights
`MatMul` (the softmax, or the sink softmax) — stays float: quantizing it gives the score tensors a
range of 1e30 and destroys them. It then compares the quantized graph with the float one on a
held-out sequence (ONNX Runtime, CPU EP) and prints a JSON report: top-1 agreement, max
|Δlogit|, node counts, the fraction of `Gemm`s whose activation input is quantized. Needs `onnx` and `onnxruntime` (ci/setup's `.py/`).
"""

import argparse
import json
import sys
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config


def graph_inputs(m):
    return {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}


def float_mask_path(m):
    """Names of the nodes that stay float: mask producers and the masked-softmax chains."""
    consumers = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    start = [n for n in m.graph.node if n.op_type == "Where" and "mask.neg" in n.input]
    keep, todo = set(), list(start)
    while todo:
        n = todo.pop()
        if n.name in keep:
            continue
        keep.add(n.name)
        for o in n.output:
            for c in consumers.get(o, []):
                # The attention-weights MatMul (probabilities × values) is quantized again.
                if c.op_type != "MatMul":
                    todo.append(c)
    return sorted(keep)


class Runner:
    """The float graph run chunk by chunk with its own cache: the inputs of every call."""

    def __init__(self, path):
        self.model = onnx.load(path)
        self.inputs = graph_inputs(self.model)
        if "position" not in self.inputs:
            sys.exit(f"{path}: not a fixed-shape export (meo export-onnx --static-shape SEQ:CONTEXT)")
        self.seq = self.inputs["input_ids"][0]
        self.context = self.inputs["past_key.0"][1]
        self.sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.sess.get_outputs()]
        logits = next(o for o in self.model.graph.output if o.name == "logits")
        self.vocab = logits.type.tensor_type.shape.dim[1].dim_value

    def feeds(self, tokens):
        tokens = tokens[: self.context]
        cache = {n: np.zeros(s, np.float32) for n, s in self.inputs.items() if n.startswith("past_")}
        out, pos = [], 0
        for i in range(0, len(tokens), self.seq):
            part = tokens[i : i + self.seq]
            ids = np.zeros(self.seq, np.int64)
            ids[: len(part)] = part
            f = {"input_ids": ids, "position": np.array([pos], np.int64), **cache}
            out.append((f, len(part)))
            r = dict(zip(self.outputs, self.sess.run(None, f)))
            cache = {n: r["present_" + n[len("past_") :]] for n in cache}
            pos += len(part)
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("output")
    ap.add_argument("--tokens", help="calibration sequences: ids separated by spaces, one sequence per line")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--activations", choices=["uint8", "uint16"], default="uint16")
    a = ap.parse_args()
    r = Runner(a.model)
    rng = np.random.default_rng(a.seed)
    length = min(r.context, 8 * r.seq)
    if a.tokens:
        with open(a.tokens) as f:
            seqs = [[int(t) for t in line.split()] for line in f if line.strip()]
        held_out = seqs.pop() if len(seqs) > 1 else rng.integers(0, r.vocab, length).tolist()
    else:
        seqs = [rng.integers(0, r.vocab, length).tolist() for _ in range(4)]
        held_out = rng.integers(0, r.vocab, length).tolist()
    calib = [f for s in seqs for f, _ in r.feeds(s)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    excluded = float_mask_path(r.model)
    act = QuantType.QUInt16 if a.activations == "uint16" else QuantType.QUInt8
    cfg = get_qnn_qdq_config(a.model, Reader(), activation_type=act, weight_type=QuantType.QUInt8,
                             nodes_to_exclude=excluded)
    quantize(a.model, a.output, cfg)

    q = ort.InferenceSession(a.output, providers=["CPUExecutionProvider"])
    same = rows = 0
    dmax = scale = 0.0
    for f, n in r.feeds(held_out):
        want = r.sess.run(["logits"], f)[0][:n]
        got = q.run(["logits"], f)[0][:n]
        same += int((want.argmax(1) == got.argmax(1)).sum())
        rows += n
        dmax = max(dmax, float(np.abs(want - got).max()))
        scale = max(scale, float(np.abs(want).max()))
    qm = onnx.load(a.output)
    ops = Counter(n.op_type for n in qm.graph.node)
    producer = {o: n.op_type for n in qm.graph.node for o in n.output}
    gemms = [n for n in qm.graph.node if n.op_type == "Gemm"]
    gemm_q = sum(producer.get(n.input[0]) == "DequantizeLinear" for n in gemms)
    print(json.dumps({
        "top1_agreement": same / rows,
        "max_dlogit": dmax,
        "max_logit": scale,
        "rows": rows,
        "calibration_calls": len(calib),
        "float_nodes": len(excluded),
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "gemms": len(gemms),
        "gemms_with_quantized_input": gemm_q,
    }))


if __name__ == "__main__":
    main()
