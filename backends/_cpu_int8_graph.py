"""cpu-int8 serialization: a lowered graph as ``graph.json`` (nodes whose targets come from an
allow-list, module configs) plus ``weights.pt`` (tensors only, loaded with ``weights_only=True``)."""

from __future__ import annotations

import json
import keyword
import math
import operator
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, GraphModule, Node

from graphopt.capture.common import first_line
from graphopt.errors import ArtifactError
from graphopt.quant import silence_quantized_deprecation
from graphopt.targets import read_json_document

__all__ = ["save_graph", "load_graph", "set_output_qparams"]

GRAPH_FILE = "graph.json"
WEIGHTS_FILE = "weights.pt"
GRAPH_FORMAT = "graphopt-qgraph/1"


# The allow-list: exactly what the lowering emits. Quantized kernels and the ops that run on
# quantized tensors (graphopt.quant's op kinds), plus the fp32 ops of the op families capture
# supports, for fp32 islands. A graph.json naming anything else is refused, not resolved:
# no name in it is ever looked up in a Python namespace.


def _named(prefix: str, ns: Any, names: str) -> dict[str, Any]:
    return {f"{prefix}.{n}": getattr(ns, n) for n in names.split()}


FUNCTIONS: dict[str, Any] = {
    **_named("torch.ops.quantized", torch.ops.quantized, "add add_relu mul mul_relu cat"),
    **_named("torch", torch, "quantize_per_tensor dequantize flatten cat concat concatenate add mul sub div mean relu "
                             "sigmoid tanh chunk split transpose permute reshape squeeze unsqueeze narrow softmax clamp"),
    # the fp32 math and indexing an ONNX import emits (graphopt.capture.onnx_file.convert), for fp32 islands
    **_named("torch", torch, "pow sqrt exp erf abs reciprocal log matmul sum amax select index_select"),
    **_named("torch.nn.functional", F, "pad interpolate"),
    **_named("torch.nn.functional", F, "relu relu6 hardtanh sigmoid hardsigmoid hardswish silu gelu tanh leaky_relu "
                                       "layer_norm softmax dropout max_pool1d max_pool2d avg_pool1d avg_pool2d "
                                       "adaptive_avg_pool1d "
                                       "adaptive_avg_pool2d adaptive_max_pool2d"),
    **_named("operator", operator, "getitem add iadd mul imul sub truediv floordiv neg"),
    "builtins.getattr": getattr,  # only as getattr(value, name) with a name in GETATTR_NAMES
}
GETATTR_NAMES = frozenset({"shape", "dtype", "ndim"})
METHODS = frozenset(
    "view reshape flatten permute transpose contiguous squeeze unsqueeze chunk split narrow size dim numel relu sigmoid "
    "tanh softmax clamp mean sum add mul sub div expand expand_as dequantize to".split()
)
FLOAT_MODULES: dict[str, type] = {
    **_named("torch.nn", nn, "Conv1d Conv2d Linear BatchNorm1d BatchNorm2d ReLU ReLU6 Hardtanh Sigmoid Hardsigmoid "
                             "Hardswish SiLU GELU Tanh LeakyReLU Softmax MaxPool1d MaxPool2d AvgPool1d AvgPool2d "
                             "AdaptiveAvgPool1d AdaptiveAvgPool2d AdaptiveMaxPool2d Flatten Dropout Dropout1d Dropout2d "
                             "Identity ChannelShuffle LayerNorm ELU LogSoftmax LocalResponseNorm AdaptiveMaxPool1d"),
    **_named("torch.ao.nn.intrinsic", nni, "ConvReLU1d ConvReLU2d LinearReLU"),
}
QUANTIZED_MODULES: dict[str, type] = {
    "Conv1d": nnq.Conv1d, "Conv2d": nnq.Conv2d, "ConvReLU1d": nniq.ConvReLU1d, "ConvReLU2d": nniq.ConvReLU2d,
    "Linear": nnq.Linear, "LinearReLU": nniq.LinearReLU, "BatchNorm2d": nnq.BatchNorm2d, "BNReLU2d": nniq.BNReLU2d,
}
_FUNCTION_NAMES = {id(fn): name for name, fn in reversed(FUNCTIONS.items())}  # first name wins for aliases
_NAME_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")  # '0' as in Sequential children
_NODE_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


def _encode_target(target: Any) -> str:
    if isinstance(target, str):
        return target
    name = _FUNCTION_NAMES.get(id(target))
    if name is None or FUNCTIONS[name] is not target:
        raise ArtifactError(f"cpu-int8 cannot save a call to {getattr(target, '__name__', target)!r}: not among the ops its "
                            "loader allows (see backends/_cpu_int8_graph.py FUNCTIONS)")
    return name


def _decode_target(text: Any, node: str) -> Any:
    fn = FUNCTIONS.get(text) if isinstance(text, str) else None
    if fn is None:
        raise ArtifactError(f"graph.json: node '{node}' calls {text!r}, which is not an op the cpu-int8 lowering emits")
    return fn


def _check_node(op: str, target: Any, args: tuple[Any, ...], name: str, modules: dict[str, Any], attrs: list[str]) -> None:
    """Refuse a node the lowering never writes: every name must be on the allow-list."""
    if op == "call_method" and (target not in METHODS or not args or not isinstance(args[0], Node)):
        raise ArtifactError(f"graph.json: node '{name}' calls the method {target!r}, which the cpu-int8 lowering never emits")
    if op == "call_function" and target is getattr and (len(args) != 2 or args[1] not in GETATTR_NAMES):
        raise ArtifactError(f"graph.json: node '{name}' reads the attribute {args[1:]!r}; allowed: {sorted(GETATTR_NAMES)}")
    if op == "call_module" and target not in modules:
        raise ArtifactError(f"graph.json: node '{name}' calls module {target!r}, which is not among its modules")
    if op == "get_attr" and target not in attrs:
        raise ArtifactError(f"graph.json: node '{name}' reads {target!r}, which is not among its saved tensors")


def _encode_value(v: Any) -> Any:
    if isinstance(v, Node):
        return {"node": v.name}
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, torch.Size):
        return {"tuple": [_encode_value(x) for x in v]}
    if isinstance(v, tuple):
        return {"tuple": [_encode_value(x) for x in v]}
    if isinstance(v, list):
        return [_encode_value(x) for x in v]
    if isinstance(v, dict):
        return {"dict": {str(k): _encode_value(x) for k, x in v.items()}}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).replace("torch.", "")}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).replace("torch.", "")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, slice):
        return {"slice": [_encode_value(v.start), _encode_value(v.stop), _encode_value(v.step)]}
    if v is Ellipsis:
        return {"ellipsis": True}
    raise ArtifactError(f"cpu-int8 cannot save the argument {v!r} ({type(v).__name__})")


def _decode_value(v: Any, nodes: dict[str, Node]) -> Any:
    if isinstance(v, list):
        return [_decode_value(x, nodes) for x in v]
    if not isinstance(v, dict):
        return v
    (key, x), = v.items()
    if key == "node":
        return nodes[x]
    if key == "tuple":
        return tuple(_decode_value(i, nodes) for i in x)
    if key == "dict":
        return {k: _decode_value(i, nodes) for k, i in x.items()}
    if key == "float":
        return float(x)
    if key in ("dtype", "memory_format"):
        value = getattr(torch, x, None) if isinstance(x, str) and x.isidentifier() and not x.startswith("_") else None
        if not isinstance(value, (torch.dtype, torch.memory_format)):
            raise ArtifactError(f"graph.json: unknown {key} '{x}'")
        return value
    if key == "device":
        return torch.device(x)
    if key == "slice":
        return slice(*(_decode_value(i, nodes) for i in x))
    if key == "ellipsis":
        return Ellipsis
    raise ArtifactError(f"graph.json: unknown value tag '{key}'")


def _float_module_config(name: str, m: nn.Module) -> dict[str, Any]:
    import inspect

    cls = type(m)
    type_name = next((k for k, c in FLOAT_MODULES.items() if c is cls), None)
    if type_name is None:
        raise ArtifactError(f"cpu-int8 cannot save module '{name}' of type {cls.__module__}.{cls.__qualname__}: "
                            "not among the modules its loader allows (see backends/_cpu_int8_graph.py FLOAT_MODULES)")
    if isinstance(m, nni._FusedModule):
        return {"kind": "fused", "type": type_name,
                "children": [_float_module_config(f"{name}.{i}", c) for i, c in enumerate(m)]}
    args: dict[str, Any] = {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.name in ("device", "dtype") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name == "bias" and isinstance(getattr(m, "bias", None), (torch.Tensor, type(None))):
            args["bias"] = m.bias is not None
        elif p.name == "elementwise_affine" and hasattr(m, "elementwise_affine"):
            args[p.name] = m.elementwise_affine
        elif hasattr(m, p.name):
            args[p.name] = _encode_value(getattr(m, p.name))
        elif p.default is p.empty:
            raise ArtifactError(f"cpu-int8 cannot save module '{name}' ({cls.__name__}): "
                                f"constructor argument '{p.name}' is not an attribute")
    return {"kind": "float", "type": type_name, "args": args}


def _build_float_module(name: str, cfg: dict[str, Any]) -> nn.Module:
    cls = FLOAT_MODULES.get(cfg["type"]) if isinstance(cfg.get("type"), str) else None
    if cls is None:
        raise ArtifactError(f"graph.json: module '{name}' has the type {cfg.get('type')!r}, "
                            "which the cpu-int8 lowering never emits")
    if cfg["kind"] == "fused":
        if not issubclass(cls, nni._FusedModule):
            raise ArtifactError(f"graph.json: module '{name}' is a fused {cfg['type']}, which is no fused module")
        return cls(*(_build_float_module(name, c) for c in cfg["children"]))
    args = {str(k): _tuple_lists(_decode_value(v, {})) for k, v in cfg["args"].items()}
    return cls(**args)


def _tuple_lists(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _module_entry(name: str, m: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    cls = type(m)
    qname = next((k for k, c in QUANTIZED_MODULES.items() if c is cls), None)
    if qname is not None:
        entry: dict[str, Any] = {"kind": "quantized", "type": qname, "scale": float(m.scale), "zero_point": int(m.zero_point)}
        if getattr(m, "pack_engine", None):
            entry["pack_engine"] = m.pack_engine
        if isinstance(m, nnq.BatchNorm2d):
            entry.update(num_features=m.num_features, eps=m.eps, momentum=m.momentum)
            for k in ("weight", "bias", "running_mean", "running_var"):
                tensors[f"{name}.{k}"] = getattr(m, k).detach().clone()
            return entry
        weight, bias = m.weight(), m.bias()
        tensors[f"{name}.weight"] = weight
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().clone()
        if isinstance(m, nnq.Linear):
            entry.update(in_features=m.in_features, out_features=m.out_features)
        else:
            entry.update(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=list(m.kernel_size),
                         stride=list(m.stride), padding=list(m.padding), dilation=list(m.dilation), groups=m.groups,
                         padding_mode=m.padding_mode)
        return entry
    entry = _float_module_config(name, m)
    for k, t in m.state_dict().items():
        tensors[f"{name}.{k}"] = t.detach().clone()
    return entry


def _build_module(name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    from graphopt.backends.cpu_int8 import (  # the backend imports this module
        ENGINES,
        engine_scope,
    )

    if entry["kind"] in ("float", "fused"):
        m = _build_float_module(name, entry)
        state = {k[len(name) + 1:]: t for k, t in tensors.items() if k.startswith(name + ".")}
        missing, unexpected = m.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ArtifactError(f"weights.pt does not fit module '{name}': missing {missing}, unexpected {unexpected}")
        return m.eval()
    cls = QUANTIZED_MODULES.get(entry["type"]) if entry["kind"] == "quantized" and isinstance(entry["type"], str) else None
    if cls is None:
        raise ArtifactError(f"graph.json: module '{name}' has the quantized type {entry.get('type')!r}, "
                            f"which the cpu-int8 lowering never emits; allowed: {sorted(QUANTIZED_MODULES)}")
    try:
        if issubclass(cls, nnq.BatchNorm2d):
            m = cls(entry["num_features"], entry["eps"], entry["momentum"])
            with torch.no_grad():
                for k in ("weight", "bias", "running_mean", "running_var"):
                    getattr(m, k).copy_(tensors[f"{name}.{k}"])
        else:
            if issubclass(cls, nnq.Linear):
                m = cls(entry["in_features"], entry["out_features"], True)  # LinearReLU names it bias, Linear bias_
            else:
                m = cls(entry["in_channels"], entry["out_channels"], tuple(entry["kernel_size"]), tuple(entry["stride"]),
                        tuple(entry["padding"]), tuple(entry["dilation"]), entry["groups"], True, entry["padding_mode"])
            packer = entry.get("pack_engine")
            if packer is not None and packer not in ENGINES:
                raise ArtifactError(f"graph.json: module '{name}' names the unknown engine '{packer}'")
            m.pack_engine = packer or torch.backends.quantized.engine
            with engine_scope(m.pack_engine):
                m.set_weight_bias(tensors[f"{name}.weight"], tensors.get(f"{name}.bias"))
    except KeyError as exc:
        raise ArtifactError(f"weights.pt has no tensor {exc} for module '{name}'") from None
    set_output_qparams(m, float(entry["scale"]), int(entry["zero_point"]))
    return m


def set_output_qparams(m: nn.Module, scale: float, zero_point: int) -> None:
    """Set a quantized module's output scale and zero point.

    Quantized conv/linear keep them as plain attributes; quantized BatchNorm (torch >= 2.10) as
    buffers, which only take tensors (assigning a float there was an internal error).
    """
    if isinstance(getattr(m, "scale", None), torch.Tensor):
        m.scale = torch.tensor(float(scale), dtype=torch.float32)
        m.zero_point = torch.tensor(int(zero_point), dtype=torch.int64)
    else:
        m.scale, m.zero_point = float(scale), int(zero_point)


def save_graph(gm: GraphModule, directory: Path, engine: str, points: dict[str, str] | None = None) -> list[str]:
    """Write ``graph.json`` and ``weights.pt`` for a lowered graph; returns the file names."""
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    attrs: list[str] = []
    nodes = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and str(n.target) not in modules:
            modules[str(n.target)] = _module_entry(str(n.target), gm.get_submodule(str(n.target)), tensors)
        if n.op == "get_attr":
            obj: Any = gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            if not isinstance(obj, torch.Tensor):
                raise ArtifactError(f"cpu-int8 cannot save attribute '{n.target}' of type {type(obj).__name__}")
            tensors[f"attr:{n.target}"] = obj.detach().clone()
            attrs.append(str(n.target))
        nodes.append({
            "name": n.name,
            "op": n.op,
            "target": _encode_target(n.target) if n.op == "call_function" else str(n.target),
            "args": _encode_value(n.args),
            "kwargs": _encode_value(dict(n.kwargs)),
        })
    doc = {"format": GRAPH_FORMAT, "engine": engine, "nodes": nodes, "modules": modules, "attrs": attrs,
           "points": dict(points or {})}
    (directory / GRAPH_FILE).write_text(json.dumps(doc, indent=1) + "\n")
    torch.save(tensors, directory / WEIGHTS_FILE)
    return [GRAPH_FILE, WEIGHTS_FILE]


def _dotted_name(text: Any, what: str) -> str:
    """fx writes these names into the Python code it generates: only dotted identifiers may pass."""
    parts = text.split(".") if isinstance(text, str) else [""]
    if not all(_NAME_PART.fullmatch(part) and not keyword.iskeyword(part) for part in parts):
        raise ArtifactError(f"graph.json: {what} {text!r} is not a dotted Python identifier")
    return text


def _read_tensors(wpath: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # torch's own rebuild of quantized tensors uses TypedStorage
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            tensors = torch.load(wpath, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - weights-only unpickling refuses anything but tensors
        raise ArtifactError(f"'{wpath}' is not a readable tensor file: {type(exc).__name__}: {first_line(exc)}") from None
    if not (isinstance(tensors, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items())):
        raise ArtifactError(f"'{wpath}' does not hold a mapping of names to tensors")
    return tensors


def _build_graph(doc: dict[str, Any], root: dict[str, Any]) -> Graph:
    graph = Graph()
    env: dict[str, Node] = {}
    for spec in doc["nodes"]:
        op, name = spec["op"], str(spec["name"])
        if op not in _NODE_OPS:
            raise ArtifactError(f"graph.json: node '{name}' has the kind {op!r}; allowed: {', '.join(_NODE_OPS)}")
        args = _decode_value(spec["args"], env)
        kwargs = _decode_value(spec["kwargs"], env)
        if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
            raise ArtifactError(f"graph.json: node '{name}' has malformed args/kwargs")
        for key in kwargs:
            _dotted_name(key, f"node '{name}' keyword")
        if op == "output":
            graph.output(args[0])
            continue
        if op == "call_function":
            target = _decode_target(spec["target"], name)
        else:
            target = _dotted_name(spec["target"], f"node '{name}' target")
        _check_node(op, target, tuple(args), name, doc["modules"], doc["attrs"])
        env[spec["name"]] = graph.create_node(op, target, tuple(args), kwargs, name=name)
    return graph


def load_graph(directory: Path, engine: str) -> tuple[GraphModule, dict[str, str]]:
    """Rebuild a lowered graph saved by :func:`save_graph` (weights repacked for ``engine``).

    Every op, method, module type and name in ``graph.json`` must be on this module's
    allow-list; ``weights.pt`` is read with ``weights_only=True``. Nothing in either file
    can make the loader or the rebuilt graph run code the lowering did not emit.
    """
    from graphopt.backends.cpu_int8 import (
        engine_scope,  # the backend imports this module
    )

    gpath, wpath = directory / GRAPH_FILE, directory / WEIGHTS_FILE
    for p in (gpath, wpath):
        if not p.is_file():
            raise ArtifactError(f"artifact '{directory}' is missing {p.name}")
    doc = read_json_document(gpath, GRAPH_FORMAT, "a graphopt cpu-int8 graph")
    silence_quantized_deprecation()
    tensors = _read_tensors(wpath)
    try:
        root: dict[str, Any] = {}
        with engine_scope(engine):
            for name, entry in doc["modules"].items():
                root[_dotted_name(name, "module name")] = _build_module(name, entry, tensors)
        for target in doc["attrs"]:
            _dotted_name(target, "attribute")  # before the lookup: the name is what fx would write into code
            root[target] = tensors[f"attr:{target}"]
        graph = _build_graph(doc, root)
        points = {str(k): str(v) for k, v in doc.get("points", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ArtifactError(f"'{gpath}' is malformed: {type(exc).__name__}: {first_line(exc)}") from None
    gm = GraphModule(root, graph, class_name="QuantizedGraphModule")
    gm.graph.lint()
    return gm.eval(), points
