"""cpu-int8 serialization: a lowered graph as ``graph.json`` (nodes whose targets come from an
allow-list, module configs) plus ``weights.pt`` (tensors only, loaded with ``weights_only=True``)."""

from __future__ import annotations

import json
import math
import operator
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

from graphopt.errors import ArtifactError
from graphopt.quant import silence_quantized_deprecation

__all__ = ["save_graph", "load_graph"]

GRAPH_FILE = "graph.json"
WEIGHTS_FILE = "weights.pt"
GRAPH_FORMAT = "graphopt-qgraph/1"


_FUNCTION_NAMESPACES: dict[str, Any] = {
    "torch": torch,
    "torch.nn.functional": F,
    "operator": operator,
}
_BUILTINS = {"getattr": getattr}
_OPS_NAMESPACES = ("quantized", "aten")
_MODULE_NAMESPACES: dict[str, Any] = {"torch.nn": nn, "torch.ao.nn.intrinsic": nni}
_QUANTIZED_MODULES: dict[str, type] = {
    "Conv1d": nnq.Conv1d, "Conv2d": nnq.Conv2d, "ConvReLU1d": nniq.ConvReLU1d, "ConvReLU2d": nniq.ConvReLU2d,
    "Linear": nnq.Linear, "LinearReLU": nniq.LinearReLU, "BatchNorm2d": nnq.BatchNorm2d, "BNReLU2d": nniq.BNReLU2d,
}


def _encode_target(target: Any) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverloadPacket):
        ns, name = target._qualified_op_name.split("::")
        return f"torch.ops.{ns}.{name}"
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target._schema.name.split("::")
        return f"torch.ops.{ns}.{name}.{target._overloadname}"
    name = getattr(target, "__name__", None)
    if name in _BUILTINS and _BUILTINS[name] is target:
        return f"builtins.{name}"
    for prefix, ns in _FUNCTION_NAMESPACES.items():
        if name and getattr(ns, name, None) is target:
            return f"{prefix}.{name}"
    raise ArtifactError(f"cpu-int8 cannot save a call to {target!r}: it is not a torch, torch.nn.functional or operator function")


def _decode_target(text: str) -> Any:
    if text.startswith("torch.ops."):
        parts = text.split(".")
        if len(parts) in (4, 5) and parts[2] in _OPS_NAMESPACES:
            packet = getattr(getattr(torch.ops, parts[2]), parts[3])
            return getattr(packet, parts[4]) if len(parts) == 5 else packet
    elif text.startswith("builtins."):
        fn = _BUILTINS.get(text.split(".", 1)[1])
        if fn is not None:
            return fn
    else:
        prefix, _, name = text.rpartition(".")
        ns = _FUNCTION_NAMESPACES.get(prefix)
        if ns is not None and not name.startswith("_") and callable(getattr(ns, name, None)):
            return getattr(ns, name)
    raise ArtifactError(f"graph.json names the function '{text}', which is not allowed")


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
        value = getattr(torch, x, None)
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
    for prefix, ns in _MODULE_NAMESPACES.items():
        if getattr(ns, cls.__name__, None) is cls:
            break
    else:
        raise ArtifactError(f"cpu-int8 cannot save module '{name}' of type {cls.__module__}.{cls.__qualname__} (only torch.nn modules)")
    if isinstance(m, nni._FusedModule):
        return {"kind": "fused", "type": f"{prefix}.{cls.__name__}",
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
            raise ArtifactError(f"cpu-int8 cannot save module '{name}' ({cls.__name__}): constructor argument '{p.name}' is not an attribute")
    return {"kind": "float", "type": f"{prefix}.{cls.__name__}", "args": args}


def _build_float_module(cfg: dict[str, Any]) -> nn.Module:
    prefix, _, cls_name = cfg["type"].rpartition(".")
    ns = _MODULE_NAMESPACES.get(prefix)
    cls = getattr(ns, cls_name, None) if ns is not None and not cls_name.startswith("_") else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ArtifactError(f"graph.json names the module type '{cfg['type']}', which is not allowed")
    if cfg["kind"] == "fused":
        return cls(*(_build_float_module(c) for c in cfg["children"]))
    args = {k: _tuple_lists(_decode_value(v, {})) for k, v in cfg["args"].items()}
    return cls(**args)


def _tuple_lists(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _module_entry(name: str, m: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    cls = type(m)
    qname = next((k for k, c in _QUANTIZED_MODULES.items() if c is cls), None)
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
    from graphopt.backends.cpu_int8 import ENGINES, engine_scope  # the backend imports this module

    if entry["kind"] != "quantized":
        m = _build_float_module(entry)
        state = {k[len(name) + 1:]: t for k, t in tensors.items() if k.startswith(name + ".")}
        missing, unexpected = m.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ArtifactError(f"weights.pt does not fit module '{name}': missing {missing}, unexpected {unexpected}")
        return m.eval()
    cls = _QUANTIZED_MODULES.get(entry["type"])
    if cls is None:
        raise ArtifactError(f"graph.json: unknown quantized module type '{entry['type']}'")
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
    m.scale = float(entry["scale"])
    m.zero_point = int(entry["zero_point"])
    return m


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


def load_graph(directory: Path, engine: str) -> tuple[GraphModule, dict[str, str]]:
    """Rebuild a lowered graph saved by :func:`save_graph` (weights repacked for ``engine``)."""
    from graphopt.backends.cpu_int8 import engine_scope  # the backend imports this module

    gpath, wpath = directory / GRAPH_FILE, directory / WEIGHTS_FILE
    for p in (gpath, wpath):
        if not p.is_file():
            raise ArtifactError(f"artifact '{directory}' is missing {p.name}")
    try:
        doc = json.loads(gpath.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"'{gpath}' is unreadable: {exc}") from None
    if doc.get("format") != GRAPH_FORMAT:
        raise ArtifactError(f"'{gpath}' has format {doc.get('format')!r}, expected '{GRAPH_FORMAT}'")
    silence_quantized_deprecation()
    try:
        with warnings.catch_warnings():  # torch's own rebuild of quantized tensors uses TypedStorage
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            tensors = torch.load(wpath, weights_only=True)
    except Exception as exc:
        raise ArtifactError(f"'{wpath}' is not a readable tensor file: {type(exc).__name__}: {exc}") from None
    root: dict[str, Any] = {}
    with engine_scope(engine):
        for name, entry in doc["modules"].items():
            root[name] = _build_module(name, entry, tensors)
    for target in doc["attrs"]:
        root[target] = tensors[f"attr:{target}"]
    graph = Graph()
    env: dict[str, Node] = {}
    try:
        for spec in doc["nodes"]:
            op = spec["op"]
            args = _decode_value(spec["args"], env)
            kwargs = _decode_value(spec["kwargs"], env)
            if op == "output":
                graph.output(args[0])
                continue
            target = _decode_target(spec["target"]) if op == "call_function" else spec["target"]
            if op == "call_method" and (not isinstance(target, str) or target.startswith("_")):
                raise ArtifactError(f"graph.json: method '{target}' is not allowed")
            env[spec["name"]] = graph.create_node(op, target, tuple(args), kwargs, name=spec["name"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"'{gpath}' is malformed: {type(exc).__name__}: {exc}") from None
    gm = GraphModule(root, graph, class_name="QuantizedGraphModule")
    gm.graph.lint()
    return gm.eval(), {str(k): str(v) for k, v in doc.get("points", {}).items()}

