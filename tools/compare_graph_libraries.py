#!/usr/bin/env python3
"""Measure onnx-ir against onnx-graphsurgeon on what onnx-lobs needs from a graph library.

Everything printed is measured by this run (nothing hard-coded); models are built here with onnx.helper,
plus the committed tests/corpus/models/*.onnx and models/lenet*.onnx. One section per criterion:
  1 uses / producers / scope of values across If, Loop, Scan (a main-graph weight read inside the bodies)
  2 weights in Constant nodes and behind Identity/Cast (fp16, bf16): representation, read, replace
  3 (--large) external data > 2 GB: peak RSS (VmHWM) and time of index / read one weight / write back /
    read + replace one weight + write back, each in a fresh subprocess, against onnx.load(load_external_data=False) + load_external_data_for_model
  4 sparse initializers and sparse Constant values on a round trip
  5 round trip proto -> library -> proto: byte identity, field-level diff, checker, onnxruntime;
    then the same after replacing one initializer's values through the library
  6 rewriting: API surface, reroute/insert/sort/cleanup, slicing Conv channels (checker + onnxruntime)
  7 speed: import+index and export of a ResNet-50-shaped model against a plain protobuf walk

    python tools/compare_graph_libraries.py            # sections 1, 2, 4-7: under a minute
    python tools/compare_graph_libraries.py --large    # adds section 3: 2.7 GB model; minutes, ~6 GB disk and RAM
"""
from __future__ import annotations

import argparse, copy, glob, json, logging, os, re, shutil, subprocess, sys, tempfile, time  # noqa: E401

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (not imported by onnx_ir itself)
import onnxruntime as ort
from onnx import TensorProto as T, helper as h, numpy_helper as nh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logging.basicConfig(level=logging.ERROR)
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
ort.set_default_logger_severity(3)
LIBS = {"onnx-ir": (ir.from_proto, ir.to_proto), "graphsurgeon": (gs.import_onnx, gs.export_onnx)}
N_BIG, SIDE = 3, 15000  # section 3: three float32 initializers of 15000 x 15000 = 900 MB each


def section(title):
    print(f"\n{'=' * 100}\n{title}\n{'=' * 100}", flush=True)

def vi(name, dt=T.FLOAT, shape=(1, 4)):
    return h.make_tensor_value_info(name, dt, shape)

def mkmodel(nodes, inputs, outputs, inits=(), opset=17, extra_opsets=(), **kw):
    return h.make_model(h.make_graph(nodes, "main", inputs, outputs, list(inits)),
                        opset_imports=[h.make_opsetid("", opset), *extra_opsets], **kw)

def rnd(shape, seed=0, dt=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dt)

def mm(a, b, o):
    return h.make_node("MatMul", [a, b], [o], name=o + "_mm")

def node_named(obj, name):
    return obj.graph.node(name) if isinstance(obj, ir.Model) else [n for n in obj.nodes if n.name == name][0]


# ----------------------------------------------------------------------------- handmade models
def m_scopes():
    """W read in the main graph, the If then-branch, the Loop body and the Scan body; Wif in both If branches."""
    then = h.make_graph([mm("h0", "W", "ta"), mm("ta", "Wif", "tb")], "then", [], [vi("tb")])
    els = h.make_graph([mm("h0", "Wif", "ea")], "else", [], [vi("ea")])
    loop = h.make_graph([mm("v", "W", "vo"), h.make_node("Identity", ["c"], ["co"], name="loop_id")], "loop",
                        [vi("i", T.INT64, []), vi("c", T.BOOL, []), vi("v")], [vi("co", T.BOOL, []), vi("vo")])
    scan = h.make_graph([mm("e", "W", "se"), h.make_node("Add", ["se", "s"], ["so"], name="scan_add"),
                         h.make_node("Identity", ["so"], ["sy"], name="scan_id")], "scan", [vi("s"), vi("e")], [vi("so"), vi("sy")])
    nodes = [mm("x", "W", "h0"), h.make_node("If", ["cond"], ["if_out"], name="if0", then_branch=then, else_branch=els),
             h.make_node("Loop", ["trip", "true", "h0"], ["loop_out"], name="loop0", body=loop),
             h.make_node("Scan", ["h0", "seq"], ["scan_s", "scan_y"], name="scan0", body=scan, num_scan_inputs=1)]
    inits = [nh.from_array(rnd((4, 4), 1), "W"), nh.from_array(rnd((4, 4), 2), "Wif"),
             nh.from_array(np.array(2, np.int64), "trip"), nh.from_array(np.array(True), "true")]
    return mkmodel(nodes, [vi("x"), vi("cond", T.BOOL, []), vi("seq", T.FLOAT, (3, 1, 4))],
                   [vi("if_out"), vi("loop_out"), vi("scan_s"), vi("scan_y", T.FLOAT, (3, 1, 4))], inits)

def m_weights():
    """A Constant-node weight behind Identity; a bf16 and an fp16 initializer behind Cast."""
    bf = h.make_tensor("Wbf", T.BFLOAT16, [4, 4], rnd((4, 4), 4, ml_dtypes.bfloat16).view(np.uint16).tobytes(), raw=True)
    nodes = [h.make_node("Constant", [], ["c"], name="const", value=nh.from_array(rnd((4, 4), 3), "cval")),
             h.make_node("Identity", ["c"], ["ci"], name="id"), mm("x", "ci", "y1"),
             h.make_node("Cast", ["Wbf"], ["wbc"], to=T.FLOAT, name="cast_bf"), mm("y1", "wbc", "y2"),
             h.make_node("Cast", ["Wf16"], ["wfc"], to=T.FLOAT, name="cast_f16"), mm("y2", "wfc", "y")]
    return mkmodel(nodes, [vi("x")], [vi("y")], [bf, nh.from_array(rnd((4, 4), 5, np.float16), "Wf16")])

def m_function():
    m = mkmodel([h.make_node("Lin", ["x", "W", "B"], ["y"], name="lin", domain="lobs")], [vi("x")], [vi("y")],
                [nh.from_array(rnd((4, 4), 6), "W"), nh.from_array(rnd((4,), 7), "B")], extra_opsets=[h.make_opsetid("lobs", 1)])
    m.functions.append(h.make_function("lobs", "Lin", ["a", "w", "b"], ["o"], [h.make_node("MatMul", ["a", "w"], ["t"]),
                                       h.make_node("Add", ["t", "b"], ["o"])], [h.make_opsetid("", 17)]))
    return m

def m_opset7():
    return mkmodel([h.make_node("Gemm", ["x", "W", "B"], ["y"], name="gemm", transB=1)],
                   [vi("x"), vi("W", shape=(4, 4)), vi("B", shape=(4,))], [vi("y")],
                   [nh.from_array(rnd((4, 4), 8), "W"), nh.from_array(rnd((4,), 9), "B")], opset=7, ir_version=3)

def m_meta():
    """metadata_props, doc_strings, value_info, typed (non-raw) tensor fields, unsorted attributes, an unnamed node."""
    conv = h.make_node("Conv", ["x", "W"], ["c"], name="conv", doc_string="node doc")
    conv.attribute.extend([h.make_attribute("pads", [1, 1, 1, 1]), h.make_attribute("kernel_shape", [3, 3])])
    m = mkmodel([conv, h.make_node("Relu", ["c"], ["r"]), h.make_node("Reshape", ["r", "shape"], ["y"], name="rs")],
                [vi("x", T.FLOAT, (1, 1, 4, 4))], [vi("y", T.FLOAT, (1, 32))],
                [h.make_tensor("W", T.FLOAT, [2, 1, 3, 3], rnd(18, 10).tolist()), h.make_tensor("shape", T.INT64, [2], [1, -1])],
                opset=13, producer_name="handmade", producer_version="1", domain="lobs.test", model_version=3, doc_string="model doc")
    m.graph.doc_string = "graph doc"
    m.graph.value_info.append(vi("c", T.FLOAT, (1, 2, 4, 4)))
    h.set_model_props(m, {"onnx_lobs.calibration": "calib.npz", "author": "x"})
    return m

def m_sparse(where):
    sp = lambda name, v, i: h.make_sparse_tensor(nh.from_array(np.array(v, np.float32), name),  # noqa: E731
                                                 nh.from_array(np.array(i, np.int64), ""), [4, 4])
    if where == "initializer":
        g = h.make_graph([mm("x", "Ws", "y")], "g", [vi("x")], [vi("y")], sparse_initializer=[sp("Ws", [1., 2., 3.], [0, 5, 10])])
        return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    return mkmodel([h.make_node("Constant", [], ["cs"], name="c", sparse_value=sp("cs", [5.], [3])), mm("x", "cs", "y")],
                   [vi("x")], [vi("y")])

def corpus():
    files = sorted(glob.glob(os.path.join(ROOT, "tests/corpus/models/*.onnx"))) + \
        [os.path.join(ROOT, "models", n) for n in ("lenet300.onnx", "lenet5.onnx")]
    return [(os.path.basename(p), onnx.load(p)) for p in files] + [
        ("hand_scopes_if_loop_scan", m_scopes()), ("hand_weights_const_fp16_bf16", m_weights()), ("hand_function", m_function()),
        ("hand_opset7_init_as_input", m_opset7()), ("hand_meta_doc_valueinfo", m_meta())]


# ----------------------------------------------------------------------------- checks
def run(m, x=None):
    """onnxruntime outputs (random float / ones int inputs, symbolic dims = 2), or the error's first line."""
    if x is None:
        inits, rng, x = {t.name for t in m.graph.initializer}, np.random.default_rng(0), {}
        for i in (i for i in m.graph.input if i.name not in inits):
            shape = [d.dim_value if d.HasField("dim_value") else 2 for d in i.type.tensor_type.shape.dim]
            dt = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            x[i.name] = np.ones(shape, dt) if dt.kind in "iub" else rng.standard_normal(shape).astype(dt)
    try:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    except Exception as e:  # noqa: BLE001
        return f"ORT error: {str(e).splitlines()[0][:110]}"

def same_outputs(a, b):
    if isinstance(a, str) or isinstance(b, str):
        return f"original: {a}" if isinstance(a, str) else b
    if all(np.array_equal(p, q, equal_nan=True) for p, q in zip(a, b)):
        return "same"
    return "DIFFERENT max|d|=%.3g" % max(float(np.max(np.abs(p.astype(np.float64) - q))) for p, q in zip(a, b))

def checker(m, full=True):
    """onnx.checker on a model (full_check: with strict shape inference) or on a path (for > 2 GB)."""
    try:
        onnx.checker.check_model(m, full_check=full)
        return "ok"
    except Exception as e:  # noqa: BLE001
        return "FAIL " + str(e).splitlines()[0][:130]

KEYS = {"NodeProto": "name", "AttributeProto": "name", "ValueInfoProto": "name", "TensorProto": "name",
        "OperatorSetIdProto": "domain", "StringStringEntryProto": "key", "FunctionProto": "name"}

def diff(a, b, path="", out=None):
    """Field-level diff of two protobuf messages -> [(path, kind, detail)]; repeated messages matched by name if unique."""
    out = [] if out is None else out
    for fd in a.DESCRIPTOR.fields:
        p, va, vb = f"{path}.{fd.name}" if path else fd.name, getattr(a, fd.name), getattr(b, fd.name)
        if fd.is_repeated and fd.message_type is not None:
            key = KEYS.get(fd.message_type.name)
            ka, kb = ([getattr(x, key) for x in v] if key else [] for v in (va, vb))
            if not key or "" in ka + kb or len(set(ka)) < len(ka) or len(set(kb)) < len(kb):  # match by position
                out += [(p, "count", f"{len(va)} -> {len(vb)}")] if len(va) != len(vb) else []
                for i, (x, y) in enumerate(zip(va, vb)):
                    diff(x, y, f"{p}[{i}]", out)
                continue
            da, db = dict(zip(ka, va)), dict(zip(kb, vb))
            for kind, names in (("dropped", [k for k in ka if k not in db]), ("added", [k for k in kb if k not in da])):
                out += [(p, kind, f"{len(names)}: {', '.join(names[:4])}{' ...' * (len(names) > 4)}")] if names else []
            out += [(p, "order changed", "")] if [k for k in ka if k in db] != [k for k in kb if k in da] else []
            for k in (k for k in ka if k in db):
                diff(da[k], db[k], f"{p}[{k}]", out)
        elif fd.is_repeated:
            out += [(p, "values", f"{len(va)} -> {len(vb)} items")] if list(va) != list(vb) else []
        elif fd.message_type is not None:
            if a.HasField(fd.name) != b.HasField(fd.name):
                out.append((p, "dropped" if a.HasField(fd.name) else "added", ""))
            elif a.HasField(fd.name):
                diff(va, vb, p, out)
        elif a.HasField(fd.name) != b.HasField(fd.name) or va != vb:
            s = lambda v, m: (f"<{len(v)} bytes>" if isinstance(v, bytes) else repr(v)[:30]) if m.HasField(fd.name) else "unset"  # noqa: E731
            out.append((p, "changed", f"{s(va, a)} -> {s(vb, b)}"))
    return out

def summarize(entries, indent="      "):
    groups = {}
    for p, kind, detail in entries:
        groups.setdefault((re.sub(r"\[[^\]]*\]", "[*]", p), kind), [0, p, detail])[0] += 1
    return [f"{indent}{pat} {kind} x{n}  e.g. {ex} {detail}" for (pat, kind), (n, ex, detail) in groups.items()]

def fresh(lib, m):
    return LIBS[lib][0](onnx.ModelProto.FromString(m.SerializeToString()))

def roundtrip(lib, m):
    try:
        return LIBS[lib][1](fresh(lib, m)), None
    except Exception as e:  # noqa: BLE001
        while e.__cause__ is not None or e.__context__ is not None:  # report the root cause
            e = e.__cause__ or e.__context__
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"

def subgraphs(m):
    return [(f"{n.name}.{a.name}", a.g) for n in m.graph.node for a in n.attribute if a.type == a.GRAPH]

def refers_to(obj, target):
    """Names of the object's (non-method) attributes that hold `target` itself: measures scope back-links."""
    names = [k for k in dir(obj) if not k.startswith("__") and not callable(getattr(type(obj), k, None))]
    return [k for k in names if getattr(obj, k, None) is target] or ["none"]


# ----------------------------------------------------------------------------- 1 scopes
def s1_scopes():
    section("1  Producers / uses / scope across If, Loop, Scan (W: main + then + loop + scan; Wif: then + else)")
    m, want = m_scopes(), {"W": {"h0_mm", "ta_mm", "vo_mm", "se_mm"}, "Wif": {"tb_mm", "ea_mm"}}
    g, gg = ir.from_proto(m), gs.import_onnx(m)
    ifn, gif = g.graph.node("if0"), node_named(gg, "if0")
    then, gthen = ifn.attributes["then_branch"].value, gif.attrs["then_branch"]
    ta, gta = then.node("ta_mm"), [n for n in gthen.nodes if n.name == "ta_mm"][0]
    tmap = {t.name: t for sg in [gg, *gg.subgraphs(recursive=True)] for n in sg.nodes for t in n.inputs}
    for w, exp in want.items():
        got, ggot = {u.node.name for u in g.graph.initializers[w].uses()}, {n.name for n in tmap[w].outputs}
        print(f"  onnx-ir      {w}.uses() -> {sorted(got)} all reported: {got == exp}\n"
              f"  graphsurgeon {w}.outputs -> {sorted(ggot)} all reported: {ggot == exp}")
    print(f"  onnx-ir      producer of body value 'ta': {ta.outputs[0].producer().name}; value.graph is the body: "
          f"{ta.outputs[0].graph is then}; W.graph is main: {g.graph.initializers['W'].graph is g.graph}; node -> its graph: "
          f"{refers_to(ta, then)}; body graph -> owning If node: {refers_to(then, ifn)}")
    print(f"  graphsurgeon producer of body value 'ta': {gta.outputs[0].inputs[0].name}; main graph.tensors() lists W: "
          f"{'W' in gg.tensors()}, Wif: {'Wif' in gg.tensors()}; node -> its graph: {refers_to(gta, gthen)}; "
          f"body graph -> owning If node: {refers_to(gthen, gif)}")
    for lib in LIBS:
        out, _ = roundtrip(lib, m)
        where = {w: [gn for gn, gp in [("main", out.graph), *subgraphs(out)] if any(t.name == w for t in gp.initializer)] for w in want}
        print(f"  {lib} round trip: W stored as initializer in {where['W']}, Wif in {where['Wif']}; "
              f"checker {checker(out)}; ORT vs original: {same_outputs(run(m), run(out))}")


# ----------------------------------------------------------------------------- 2 Constant / Identity / Cast weights
def find_weight(lib, obj, name):
    """Walk back from MatMul input 1 through Identity/Cast to the tensor: (hops, description, array, setter)."""
    hops, v = [], node_named(obj, name).inputs[1]
    if lib == "onnx-ir":
        while v.const_value is None and v.producer() is not None and v.producer().op_type in ("Identity", "Cast"):
            hops.append(v.producer().op_type)
            v = v.producer().inputs[0]
        t, node = ir.convenience.get_const_tensor(v), v.producer()
        desc = f"{'Constant node attr' if node else 'initializer const_value'} {type(t).__name__} dtype={t.dtype.name}"
        setter = ((lambda a: node.attributes.__setitem__("value", ir.AttrTensor("value", ir.tensor(a)))) if node else
                  (lambda a: setattr(v, "const_value", ir.tensor(a, name=v.name))))
        return hops, desc, t.numpy(), setter
    while not isinstance(v, gs.Constant) and v.inputs and v.inputs[0].op in ("Identity", "Cast", "Constant"):
        hops.append(v.inputs[0].op)
        v = v.inputs[0].attrs["value"] if v.inputs[0].op == "Constant" else v.inputs[0].inputs[0]
    return hops, f"{type(v).__name__}({type(v._values).__name__}) dtype={v.dtype}", v.values, lambda a: setattr(v, "values", a)

def s2_weights():
    section("2  Weights in a Constant node (behind Identity) and bf16/fp16 initializers behind Cast: read, replace")
    m, x = m_weights(), {"x": rnd((1, 4), 11)}
    ref = {t.name: nh.to_array(t) for t in m.graph.initializer} | {"c": nh.to_array(m.graph.node[0].attribute[0].t)}
    new = {k: (v * 2).astype(v.dtype) for k, v in ref.items()}
    expect = (x["x"] @ new["c"]) @ new["Wbf"].astype(np.float32) @ new["Wf16"].astype(np.float32)
    for lib in LIBS:
        obj = fresh(lib, m)
        for node, src in (("y1_mm", "c"), ("y2_mm", "Wbf"), ("y_mm", "Wf16")):
            hops, desc, arr, setter = find_weight(lib, obj, node)
            print(f"  {lib:12s} {node} weight via {'->'.join(hops)}: {desc} numpy={arr.dtype} values equal="
                  f"{np.array_equal(arr, ref[src])} array writeable in place={arr.flags.writeable}")
            setter(new[src])
        out = LIBS[lib][1](obj)
        r = run(out, x)
        print(f"  {lib:12s} after replacing all three (x2, same dtype): checker {checker(out)}; initializer dtypes kept: "
              f"{[t.data_type for t in out.graph.initializer] == [t.data_type for t in m.graph.initializer]}; ORT == numpy: "
              f"{r if isinstance(r, str) else np.allclose(r[0], expect, rtol=1e-5, atol=1e-5)}")
    (fold := gs.import_onnx(m)).fold_constants().cleanup()
    print(f"  (graphsurgeon fold_constants+cleanup: {len(m.graph.node)} nodes -> {[n.op for n in fold.nodes]})")


# ----------------------------------------------------------------------------- 3 external data > 2 GB
def child(lib, phase, d):
    """One measurement in a fresh process (run from /tmp, not from the model's folder); prints JSON."""
    src, info, t0 = os.path.join(d, "model.onnx"), {}, time.perf_counter()
    if lib == "onnx":
        proto_index(m := onnx.load(src, load_external_data=False))
        get = lambda: [t for t in m.graph.initializer if t.name == "W1"][0]  # noqa: E731
    elif lib == "onnx-ir":
        m = ir.load(src)
        sum(len(v.uses()) for n in m.graph.all_nodes() for v in n.inputs)
        get = lambda: m.graph.initializers["W1"].const_value  # noqa: E731
    elif lib != "none":  # graphsurgeon over a proto without data, or (+data) the usual onnx.load with data
        m = gs.import_onnx(onnx.load(src, load_external_data=(lib == "graphsurgeon+data")))
        get = lambda: m.tensors()["W1"]  # noqa: E731
    info["t_load"] = time.perf_counter() - t0
    if phase in ("read", "edit"):
        t0, values = time.perf_counter(), {"onnx": lambda o: nh.to_array(o, base_dir=d), "onnx-ir": lambda o: o.numpy()}
        try:
            a = values.get(lib, lambda o: o.values)(obj := get())
        except Exception as e:  # noqa: BLE001
            info["read_error"] = f"{type(e).__name__}: {str(e)[:90]} -> retried after chdir(model folder)"
            os.chdir(d)
            a = values.get(lib, lambda o: o.values)(obj := get())
        info["type"] = type(obj).__name__ + (f"({type(obj._values).__name__})" if lib.startswith("graph") else "")
        info["sum"], info["t_read"] = float(a.sum(dtype=np.float64)), time.perf_counter() - t0
        info["data file mmapped"] = any("model.data" in ln for ln in open("/proc/self/maps"))
    if phase in ("write", "edit"):  # edit: W1 gets new values (x0.5, a new array) before the write
        t0, out, loc = time.perf_counter(), os.path.join(d, f"out_{lib}.onnx"), f"out_{lib}.data"
        if lib == "onnx-ir":
            if phase == "edit":
                m.graph.initializers["W1"].const_value = ir.tensor(a * np.float32(0.5), name="W1")
            ir.save(m, out, external_data=loc)
        else:
            if phase == "edit" and lib != "onnx":
                obj.values = a * np.float32(0.5)
            p = m if lib == "onnx" else gs.export_onnx(m)
            try:
                lib in ("onnx", "graphsurgeon") and onnx.load_external_data_for_model(p, d)
            except Exception as e:  # noqa: BLE001  (gs keeps data_location=EXTERNAL on a Constant given new values)
                info["write_error"] = f"{type(e).__name__}: {str(e)[:80]} -> retried with Constant.data_location = None"
                obj.data_location = None
                onnx.load_external_data_for_model(p := gs.export_onnx(m), d)
            if phase == "edit" and lib == "onnx":
                obj.raw_data = (a * np.float32(0.5)).tobytes()
            onnx.save_model(p, out, save_as_external_data=True, all_tensors_to_one_file=True, location=loc)
        info["t_write"] = time.perf_counter() - t0
    f = dict(ln.split(":", 1) for ln in open("/proc/self/status"))
    print(json.dumps(info | {k: int(f[k].split()[0]) // 1024 for k in ("VmHWM", "RssAnon", "RssFile")}))

def measure(lib, phase, d):
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", lib, phase, d], cwd="/tmp",
                       capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if p.returncode == 0 and lines else {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:150]}

def same_data(d, out, edited):
    """Every initializer of the written model equals the source's, W1 x0.5 if edited (np.memmap, in chunks)."""
    def arrays(path):
        ext = {t.name: {e.key: e.value for e in t.external_data} for t in onnx.load(path, load_external_data=False).graph.initializer}
        return {k: np.memmap(os.path.join(d, e["location"]), np.float32, "r", int(e.get("offset", 0)), (SIDE * SIDE,))
                for k, e in ext.items()}
    a, b = arrays(os.path.join(d, "model.onnx")), arrays(out)
    f = lambda k: np.float32(0.5) if edited and k == "W1" else np.float32(1)  # noqa: E731
    return a.keys() == b.keys() and all(np.array_equal(a[k][i:i + 10**7] * f(k), b[k][i:i + 10**7])
                                        for k in a for i in range(0, SIDE * SIDE, 10**7))

def s3_large():
    mib = SIDE * SIDE * 4 / 2**20
    section(f"3  External data: {N_BIG} float32 initializers of {mib:.0f} MiB; each row a fresh subprocess (warm page cache)")
    d, t0 = tempfile.mkdtemp(prefix="graphlib_large_", dir="/tmp"), time.perf_counter()
    try:
        inits = [nh.from_array(np.full((SIDE, SIDE), (i + 1) / SIDE, np.float32), f"W{i}") for i in range(N_BIG)]
        m = mkmodel([mm(f"h{i}" if i else "x", f"W{i}", f"h{i + 1}") for i in range(N_BIG)], [vi("x", T.FLOAT, (1, SIDE))],
                    [vi(f"h{N_BIG}", T.FLOAT, (1, SIDE))], inits)
        del inits
        onnx.save_model(m, os.path.join(d, "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location="model.data")
        del m
        print(f"  built with onnx.save_model(save_as_external_data=True): {os.path.getsize(os.path.join(d, 'model.data')) / 1e9:.2f} GB"
              f" in {time.perf_counter() - t0:.0f} s; checker(path): {checker(os.path.join(d, 'model.onnx'), False)}")
        base = measure("none", "index", d)["VmHWM"]
        print(f"  python + imports alone: peak RSS {base} MiB; 'extra' = (peak - that) in units of one {mib:.0f} MiB weight\n"
              f"  {'library':18s} {'phase':6s} {'load s':>7s} {'read s':>7s} {'write s':>8s} {'peak MiB':>8s} {'extra':>6s} "
              f"{'RssAnon':>8s} {'RssFile':>8s}  notes (RssAnon/RssFile: MiB at the end of the phase)")
        for lib in ("onnx", "onnx-ir", "graphsurgeon", "graphsurgeon+data"):
            for phase in ("index", "read", "write", "edit"):
                if "error" in (r := measure(lib, phase, d)):
                    print(f"  {lib:18s} {phase:6s} FAILED: {r['error']}")
                    continue
                notes = {k: r[k] for k in ("type", "data file mmapped", "read_error", "write_error") if k in r}
                if phase in ("write", "edit"):
                    out = os.path.join(d, f"out_{lib}.onnx")
                    notes |= {"output checker(path)": checker(out, False), "data as expected": same_data(d, out, phase == "edit")}
                    for f in (out, os.path.join(d, f"out_{lib}.data")):
                        os.path.exists(f) and os.remove(f)
                print(f"  {lib:18s} {phase:6s} {r['t_load']:7.2f} {r.get('t_read', 0):7.2f} {r.get('t_write', 0):8.2f} "
                      f"{r['VmHWM']:8d} {(r['VmHWM'] - base) / mib:6.2f} {r['RssAnon']:8d} {r['RssFile']:8d}  {notes}", flush=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------- 4 sparse
def s4_sparse():
    section("4  Sparse tensors: graph.sparse_initializer and a Constant(sparse_value)")
    for where in ("initializer", "constant"):
        for lib, m in ((lib, m_sparse(where)) for lib in LIBS):
            out, err = roundtrip(lib, m)
            print(f"  {where:11s} {lib:13s} " + (f"REFUSED: {err}" if err else
                  f"sparse_initializer {len(m.graph.sparse_initializer)} -> {len(out.graph.sparse_initializer)}; diff: "
                  f"{'; '.join(summarize(diff(m, out), '')) or 'none'}; checker (no shape inference): {checker(out, False)};"
                  f" ORT vs original: {same_outputs(run(m), run(out))}"))


# ----------------------------------------------------------------------------- 5 round trip
def replace_largest(lib, m):
    """Through the library: the largest float initializer of the main graph gets new values (x0.5, same dtype)."""
    t = max((t for t in m.graph.initializer if t.data_type in (T.FLOAT, T.FLOAT16, T.BFLOAT16, T.DOUBLE)),
            key=lambda t: int(np.prod(t.dims)))
    new, obj = (nh.to_array(t) * 0.5).astype(nh.to_array(t).dtype), fresh(lib, m)
    if lib == "onnx-ir":
        obj.graph.initializers[t.name].const_value = ir.tensor(new, name=t.name)
    else:
        obj.tensors()[t.name].values = new
    return t.name, LIBS[lib][1](obj)

def s5_roundtrip():
    section("5  Round trip proto -> library -> proto: bytes, field-level diff, checker, ORT; then one initializer replaced")
    for name, m in corpus():
        src = m.SerializeToString()
        print(f"\n  {name} ({len(src)} bytes, ir_version {m.ir_version}, opset {m.opset_import[0].version}, "
              f"{len(m.graph.node)} nodes, {len(m.graph.initializer)} initializers, {len(m.graph.value_info)} value_info)")
        for lib in LIBS:
            out, err = roundtrip(lib, m)
            if err:
                print(f"    {lib:13s} FAILED: {err}")
                continue
            d = diff(m, out)
            print(f"    {lib:13s} byte-identical: {out.SerializeToString() == src}; {len(out.SerializeToString())} bytes; "
                  f"checker {checker(out)}; ORT vs original: {same_outputs(run(m), run(out))}; {len(d)} field diffs:")
            print("\n".join(summarize(d)) or "      (none)")
            wname, edited = replace_largest(lib, m)
            de = diff(m, edited)
            own = sorted({p.split("].")[-1] + " " + k for p, k, _ in de if f"initializer[{wname}]" in p})
            rest = {(p, k) for p, k, _ in de if f"initializer[{wname}]" not in p}
            print(f"      edit of '{wname}': its own fields changed: {own}; other differences {len(rest)} (same set as the "
                  f"plain round trip's: {rest == {(p, k) for p, k, _ in d}}); ORT runs: {not isinstance(run(edited), str)}")


# ----------------------------------------------------------------------------- 6 rewriting
def edit_chain(lib, obj):
    """Sort, drop the Identity (reroute its uses), insert Mul(x, 2) before Relu, remove the dead Neg."""
    if lib == "onnx-ir":
        (g := obj.graph).sort()
        idn, relu = g.node("id"), g.node("relu")
        idn.outputs[0].replace_all_uses_with(idn.inputs[0])
        g.remove(idn, safe=True)
        g.register_initializer(two := ir.Value(name="two", const_value=ir.tensor(np.float32(2), name="two")))
        g.insert_before(relu, mul := ir.node("Mul", [g.inputs[0], two], name="mul"))
        relu.replace_input_with(0, mul.outputs[0])
        ir.passes.common.RemoveUnusedNodesPass()(obj)
        return [n.op_type for n in g]
    idn = node_named(obj, "id")
    for consumer in list(idn.outputs[0].outputs):  # no replace-all-uses call: rewire each consumer
        consumer.inputs[consumer.inputs.index(idn.outputs[0])] = idn.inputs[0]
    idn.outputs.clear()
    two, mout = gs.Constant("two", np.array(2, np.float32)), gs.Variable("m", dtype=np.float32)
    obj.nodes.append(gs.Node("Mul", "mul", inputs=[obj.inputs[0], two], outputs=[mout]))
    node_named(obj, "relu").inputs[0] = mout
    obj.cleanup().toposort()
    return [n.op for n in obj.nodes]

def slice_channels(lib, m, keep, clear_shapes):
    """Conv1 keeps output channels `keep` (W1, B1), conv2 the same input channels (W2), through the library."""
    arrs, obj = {t.name: nh.to_array(t) for t in m.graph.initializer}, fresh(lib, m)
    for k, a in {"W1": arrs["W1"][keep], "B1": arrs["B1"][keep], "W2": arrs["W2"][:, keep]}.items():
        if lib == "onnx-ir":
            v = obj.graph.initializers[k]
            v.const_value, v.shape = ir.tensor(a, name=k), ir.Shape(a.shape)
        else:
            obj.tensors()[k].values = a
    for name in ("c1", "r1") if clear_shapes else ():
        (node_named(obj, {"c1": "conv1", "r1": "relu1"}[name]).outputs[0] if lib == "onnx-ir" else obj.tensors()[name]).shape = None
    return LIBS[lib][1](obj)

def s6_rewrite():
    section("6  Rewriting: API surface; small edits checked by onnx.checker (full) and onnxruntime")
    api = {"onnx-ir": "Value.replace_all_uses_with Node.replace_input_with Graph.remove Graph.insert_before Graph.insert_after "
                      "Graph.sort Graph.register_initializer Graph.all_nodes convenience.replace_nodes_and_values "
                      "passes.common.RemoveUnusedNodesPass passes.common.IdentityEliminationPass passes.common.ShapeInferencePass",
           "graphsurgeon": "Graph.cleanup Graph.toposort Graph.fold_constants Graph.layer Graph.subgraphs Graph.copy "
                           "Tensor.replace_all_uses_with Graph.remove Graph.insert_before"}
    for (lib, names), root in zip(api.items(), (ir, gs)):
        has = lambda path, o=root: all((o := getattr(o, part, None)) is not None for part in path.split("."))  # noqa: E731
        print(f"  {lib:13s} " + ", ".join(f"{n}:{'yes' if has(n) else 'NO'}" for n in names.split()))
    chain = mkmodel([h.make_node("Neg", ["x"], ["dead"], name="neg"), h.make_node("Relu", ["i"], ["y"], name="relu"),
                     h.make_node("Identity", ["x"], ["i"], name="id")], [vi("x")], [vi("y")])  # reversed: not topological
    x = {"x": rnd((1, 4), 30)}
    for lib in LIBS:
        ops = edit_chain(lib, obj := fresh(lib, chain))
        r = run(out := LIBS[lib][1](obj), x)
        print(f"  {lib:13s} sort + remove Identity (reroute uses) + insert Mul(x,2) before Relu + dead-node cleanup -> {ops}; "
              f"checker {checker(out)}; ORT == expected: {r if isinstance(r, str) else np.allclose(r[0], np.maximum(2 * x['x'], 0))}")
    scopes = m_scopes()
    for lib, how in (("onnx-ir", "RemoveUnusedNodesPass"), ("graphsurgeon", "cleanup()"),
                     ("graphsurgeon", "cleanup(remove_unused_graph_inputs=True)")):
        obj = fresh(lib, scopes)
        ir.passes.common.RemoveUnusedNodesPass()(obj) if lib == "onnx-ir" else obj.cleanup(remove_unused_graph_inputs="True" in how)
        out = LIBS[lib][1](obj)
        n_init = lambda m: sum(len(g.initializer) for _, g in [("", m.graph), *subgraphs(m)])  # noqa: E731
        print(f"  {lib:13s} {how} on the If/Loop/Scan model: initializers in all graphs {n_init(scopes)} -> {n_init(out)}; "
              f"checker {checker(out)}; ORT vs original: {same_outputs(run(scopes), run(out))}")
    shapes = {"W1": (8, 3, 3, 3), "B1": (8,), "W2": (4, 8, 3, 3), "B2": (4,)}
    m = onnx.shape_inference.infer_shapes(mkmodel(  # value_info for c1/r1: shapes that the channel edit makes stale
        [h.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1] * 4), h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         h.make_node("Conv", ["r1", "W2", "B2"], ["y"], name="conv2", pads=[1] * 4)], [vi("x", T.FLOAT, (1, 3, 8, 8))],
        [vi("y", T.FLOAT, (1, 4, 8, 8))], [nh.from_array(rnd(s, 20 + i), n) for i, (n, s) in enumerate(shapes.items())], opset=13))
    zeroed, xin = copy.deepcopy(m), {"x": rnd((1, 3, 8, 8), 31)}
    for t in (t for t in zeroed.graph.initializer if t.name != "B2"):  # reference: the original, removed channels zeroed
        a = nh.to_array(t).copy()
        a[(slice(None),) * (t.name == "W2") + ([1, 5],)] = 0
        t.CopyFrom(nh.from_array(a, t.name))
    ref = run(zeroed, xin)[0]
    for lib in LIBS:
        for clear in (False, True):
            r = run(out := slice_channels(lib, m, [0, 2, 3, 4, 6, 7], clear), xin)
            c1 = [[d.dim_value for d in v.type.tensor_type.shape.dim] for v in out.graph.value_info if v.name == "c1"]
            print(f"  {lib:13s} slice conv1 out-ch 8->6 + conv2 in-ch{' + clear c1/r1 shapes' if clear else ''}: value_info c1 "
                  f"{c1}; checker {checker(out)}; ORT vs zeroed original: {r if isinstance(r, str) else 'max|d|=%.2g' % np.max(np.abs(r[0] - ref))}")


# ----------------------------------------------------------------------------- 7 speed
def best(f, reps=3):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        r = f()
        ts.append(time.perf_counter() - t)
    return min(ts), r

def proto_index(m):
    producers, uses = {}, {}
    for n in m.graph.node:
        for i, v in enumerate(n.input):
            uses.setdefault(v, []).append((n, i))
        producers.update((v, n) for v in n.output)
    return producers, uses, {t.name: t for t in m.graph.initializer}

def s7_speed():
    section("7  Speed on a ResNet-50-shaped model (best of 3, seconds)")
    try:
        sys.path.insert(0, os.path.join(ROOT, "tools"))
        import bench_speed  # imports onnx_lobs, which others are editing: fall back to a conv chain if that breaks
        m, what = bench_speed.resnet((3, 4, 6, 3), True).model(), "bench_speed.resnet((3, 4, 6, 3), True)"
    except Exception as e:  # noqa: BLE001
        m, what = mkmodel([h.make_node("Conv", [f"x{i}" if i else "x", f"W{i}"], [f"x{i + 1}"], name=f"c{i}", pads=[1] * 4)
                           for i in range(53)], [vi("x", T.FLOAT, (1, 256, 56, 56))], [vi("x53", T.FLOAT, (1, 256, 56, 56))],
                          [nh.from_array(rnd((256, 256, 3, 3), i), f"W{i}") for i in range(53)]), f"53-conv chain ({e})"
    data = m.SerializeToString()
    print(f"  {what}: {len(m.graph.node)} nodes ({sum(n.op_type == 'Conv' for n in m.graph.node)} Conv), "
          f"{len(m.graph.initializer)} initializers, {len(data) / 1e6:.1f} MB serialized")
    t_parse, proto = best(lambda: onnx.ModelProto.FromString(data))
    t_walk, t_ser = best(lambda: proto_index(proto))[0], best(lambda: proto.SerializeToString())[0]
    print(f"  protobuf parse {t_parse:.4f}; plain walk over graph.node (producers + uses + initializers) {t_walk:.4f}; "
          f"SerializeToString {t_ser:.4f}")
    walk = {"onnx-ir": lambda g: sum(len(v.uses()) for n in g.graph.all_nodes() for v in n.inputs if v is not None),
            "graphsurgeon": lambda g: sum(len(t.outputs) for t in g.tensors().values())}
    for lib, (imp, exp) in LIBS.items():
        t_imp, obj = best(lambda: imp(proto))
        t_idx, t_exp = best(lambda: walk[lib](obj))[0], best(lambda: exp(obj).SerializeToString())[0]
        print(f"  {lib:13s} import (index built) {t_imp:.4f} = {t_imp / t_walk:.0f}x the plain walk; query every use {t_idx:.4f}; "
              f"export + SerializeToString {t_exp:.4f} = {t_exp / t_ser:.2f}x SerializeToString")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", action="store_true", help="also run section 3 (a 2.7 GB model with external data)")
    ap.add_argument("--child", nargs=3, metavar=("LIB", "PHASE", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    print(f"onnx {onnx.__version__}, onnx-ir {ir.__version__}, onnx-graphsurgeon {gs.__version__}, onnxruntime {ort.__version__},"
          f" numpy {np.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} cores")
    t0 = time.perf_counter()
    for f in (s1_scopes, s2_weights, s3_large if args.large else lambda: section("3  External data > 2 GB: skipped (run with --large)"),
              s4_sparse, s5_roundtrip, s6_rewrite, s7_speed):
        f()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
