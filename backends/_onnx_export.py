"""The program as an ONNX model: ``torch.onnx.export`` with a diagnosis of what does not export.

The TorchScript exporter (``dynamo=False``, opset :data:`OPSET`, the fixed input shapes
of ``program.input_specs``) first; for fp32, where it fails, the torch.export-based one.
When both fail, every fx node is exported on its own to name the first that cannot be
(:class:`OnnxExportError` names it, with its source line). Shared by every ONNX-consuming
target; the int8 Q/DQ form is :mod:`graphopt.backends._onnx_qdq`.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx import GraphModule, Node

from graphopt.errors import LoweringError, first_line
from graphopt.fx_util import describe
from graphopt.program import Program

#: Opset of the TorchScript exporter (QuantizeLinear/DequantizeLinear with ``axis``
#: need 13; 17 is the newest all of onnx/onnxruntime/TensorRT read without surprises).
OPSET = 17
#: The torch.export-based exporter (fallback for fp32 only) starts at 18.
DYNAMO_OPSET = 18


class OnnxExportError(LoweringError):
    """The program could not be turned into an ONNX model (names the node at fault)."""


class _Flat(nn.Module):
    """Returns the program's output leaves as a flat tuple (ONNX outputs are a flat list)."""

    def __init__(self, gm: nn.Module) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(pytree.tree_leaves(self.gm(*inputs)))


def _output_spec(gm: nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[pytree.TreeSpec, int]:
    with torch.no_grad():
        out = gm(*example)
    leaves, spec = pytree.tree_flatten(out)
    bad = [type(x).__name__ for x in leaves if not isinstance(x, torch.Tensor)]
    if bad:
        kinds = ", ".join(sorted(set(bad)))
        raise OnnxExportError(f"the model returns non-tensor values ({kinds}); ONNX outputs are tensors only")
    if not leaves:
        raise OnnxExportError("the model returns no tensor")
    return spec, len(leaves)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation, tracer warnings
        yield


def _torchscript_export(module: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
                        output_names: list[str], opset: int = OPSET) -> bytes:
    buf = io.BytesIO()
    # On failure the exporter prints the whole TorchScript graph to stdout.
    with _quiet_export(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(module, example, buf, dynamo=False, opset_version=opset, input_names=input_names,
                          output_names=output_names, do_constant_folding=True)
    return buf.getvalue()


def _dynamo_export(module: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
                   output_names: list[str]) -> bytes:
    import logging

    quiet = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.CRITICAL)
    try:
        silent = (contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()))
        with _quiet_export(), torch.no_grad(), silent[0], silent[1]:
            prog = torch.onnx.export(module, example, dynamo=True, opset_version=DYNAMO_OPSET, input_names=input_names,
                                     output_names=output_names, verbose=False, report=False)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    return prog.model_proto.SerializeToString()


class _OneNode(nn.Module):
    """One fx node as a module, its tensor arguments as inputs (for diagnosis)."""

    def __init__(self, gm: GraphModule, n: Node, values: dict[Node, Any]) -> None:
        super().__init__()
        self.gm, self.node = gm, n
        self.tensor_args = [a for a in dict.fromkeys(_nodes_in((n.args, n.kwargs))) if isinstance(values.get(a), torch.Tensor)]
        self.values = values

    def forward(self, *tensors: torch.Tensor) -> Any:
        env = dict(zip(self.tensor_args, tensors))
        fill = lambda a: env[a] if a in env else self.values[a]  # noqa: E731
        args = torch.fx.node.map_arg(self.node.args, fill)
        kwargs = torch.fx.node.map_arg(self.node.kwargs, fill)
        n = self.node
        if n.op == "call_module":
            return self.gm.get_submodule(str(n.target))(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        return getattr(args[0], str(n.target))(*args[1:], **kwargs)


def _nodes_in(a: Any) -> list[Node]:
    found: list[Node] = []
    torch.fx.node.map_arg(a, lambda x: found.append(x) or x)
    return found


def _diagnose(gm: GraphModule, example: tuple[torch.Tensor, ...]) -> str | None:
    """The first fx node that does not export on its own, described; None if all do."""
    values: dict[Node, Any] = {}

    class _Record(torch.fx.Interpreter):
        def run_node(self, n: Node) -> Any:
            out = super().run_node(n)
            values[n] = out
            return out

    try:
        with torch.no_grad():
            _Record(gm).run(*example)
    except Exception as exc:  # the graph does not even run: name where
        bad = next((n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and n not in values), None)
        return f"{describe(gm, bad)} fails to run: {first_line(exc)}" if bad is not None else None
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "call_function", "call_method"):
            continue
        out = values.get(n)
        tensors = isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out)
        if not (isinstance(out, torch.Tensor) or tensors):
            continue
        one = _OneNode(gm, n, values)
        inputs = tuple(values[a] for a in one.tensor_args)
        if not inputs:
            continue
        try:
            _torchscript_export(_Flat(one), inputs, [f"in_{i}" for i in range(len(inputs))],
                                [f"out_{i}" for i in range(len(pytree.tree_leaves(out)))])
        except Exception as exc:
            return f"{describe(gm, n)}: {first_line(exc)}"
    return None


def _export(gm: GraphModule, example: tuple[torch.Tensor, ...], input_names: list[str], *, what: str,
            allow_dynamo: bool) -> tuple[bytes, str, int, pytree.TreeSpec]:
    """(ONNX bytes, exporter name, opset, output spec) of ``gm``."""
    spec, n_out = _output_spec(gm, example)
    output_names = [f"output_{i}" for i in range(n_out)]
    wrapper = _Flat(gm).eval()
    try:
        return _torchscript_export(wrapper, example, input_names, output_names), "torchscript", OPSET, spec
    except Exception as exc:
        first = exc
    if allow_dynamo:
        try:
            return _dynamo_export(wrapper, example, input_names, output_names), "dynamo", DYNAMO_OPSET, spec
        except Exception:
            pass
    where = _diagnose(gm, example)
    if where:
        raise OnnxExportError(f"{what}: cannot export {where} (torch.onnx, opset {OPSET})") from None
    raise OnnxExportError(f"{what}: torch.onnx.export failed: {type(first).__name__}: {first_line(first)}") from None


def _check(model: Any, what: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise OnnxExportError(f"{what}: the exported ONNX model does not pass onnx.checker: {first_line(exc)}") from None


def export_fp32(program: Program, what: str) -> tuple[bytes, dict[str, Any], pytree.TreeSpec]:
    """ONNX bytes of the (fp32) program, manifest fields, output structure. ``what``: the target, for messages."""
    import onnx

    gm = program.graph_module.eval()
    example = tuple(t.detach() for t in program.example_inputs)
    names = [s.name for s in program.input_specs]
    data, exporter, opset, spec = _export(gm, example, names, what=what, allow_dynamo=True)
    model = onnx.load_from_string(data)
    _check(model, what)
    return data, {"exporter": exporter, "opset": opset}, spec
