"""Program: the unit every pass reads and rewrites.

A Program is a module-level ``torch.fx.GraphModule`` (Conv2d, BatchNorm2d, Linear,
activations and pooling stay ``call_module`` nodes), the example inputs it was captured
with, and ``meta``: where it came from and what passes learned about it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

__all__ = ["InputSpec", "Program", "flatten_outputs", "delete_unused_submodules", "name_prefixes", "MAX_INPUT_BYTES",
           "input_bytes", "size_text", "ShapeProp"]

#: The largest input tensor graphopt will make (random inputs, calibration, verification): 2 GiB.
#: A bigger ``--input-shape`` is refused before anything is allocated.
MAX_INPUT_BYTES = 2 * 1024**3


def input_bytes(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one tensor of ``shape`` and ``dtype`` (computed without allocating it)."""
    return math.prod(int(d) for d in shape) * torch.empty((), dtype=dtype).element_size()


def size_text(n: float) -> str:
    """``3221225472`` -> ``'3 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"  # pragma: no cover


@dataclass(frozen=True)
class InputSpec:
    """Name, shape and dtype of one model input."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    def random(self, generator: torch.Generator) -> torch.Tensor:
        """A random tensor of this spec (standard normal for floats)."""
        if self.dtype.is_floating_point:
            return torch.randn(self.shape, generator=generator, dtype=self.dtype)
        return torch.randint(0, 10, self.shape, generator=generator, dtype=self.dtype)

    def shape_text(self) -> str:
        return "x".join(str(d) for d in self.shape)


@dataclass
class Program:
    """A captured model: graph module + example inputs + metadata."""

    graph_module: torch.fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    #: Calibration samples (tuples of input tensors) for passes that need data, such as
    #: insert-quant-stubs. Shared, not copied, by ``clone()``: treat as read-only.
    calibration: list[tuple[torch.Tensor, ...]] | None = None
    #: What verification compares against when the original is not this graph: the source file run by its
    #: own runtime (ONNX Runtime for an .onnx, the ScriptModule for TorchScript). Set by capture; shared by ``clone()``.
    #: ``meta["reference_runtime"]`` names it. None: the captured graph itself is the reference.
    reference: Callable[..., Any] | None = None

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph

    @property
    def input_specs(self) -> list[InputSpec]:
        names = [n.target for n in self.graph.nodes if n.op == "placeholder"]
        return [
            InputSpec(str(name), tuple(t.shape), t.dtype)
            for name, t in zip(names, self.example_inputs)
        ]

    def __call__(self, *inputs: torch.Tensor) -> Any:
        return self.run(*inputs)

    def run(self, *inputs: torch.Tensor) -> Any:
        """Run the graph in inference mode."""
        with torch.inference_mode():
            return self.graph_module(*inputs)

    def run_reference(self, *inputs: torch.Tensor) -> Any:
        """The original's outputs: ``reference`` when capture set one, else this graph's."""
        if self.reference is None:
            return self.run(*inputs)
        with torch.inference_mode():
            return self.reference(*inputs)

    def node_count(self) -> int:
        """Nodes that compute something (placeholders and output excluded)."""
        return sum(1 for n in self.graph.nodes if n.op not in ("placeholder", "output"))

    def modules(self) -> dict[str, torch.nn.Module]:
        return dict(self.graph_module.named_modules())

    def propagate_shapes(self) -> None:
        """Fill ``node.meta['tensor_meta']`` by running the example inputs (as fx's ShapeProp does).

        A node that fails raises a RuntimeError whose one-line message names it (fx's
        ShapeProp prints a traceback to stderr first; this does not).
        """
        with torch.no_grad():
            ShapeProp(self.graph_module).run(*(t.clone() for t in self.example_inputs))

    def clone(self) -> "Program":
        """A deep copy: rewriting the clone never touches this Program's weights."""
        gm = copy.deepcopy(self.graph_module)
        return Program(gm, tuple(t.clone() for t in self.example_inputs), copy.deepcopy(self.meta), self.calibration,
                       self.reference)

    def recompile(self) -> None:
        self.graph.lint()
        self.graph_module.recompile()


class ShapeProp(torch.fx.Interpreter):
    """``torch.fx.passes.shape_prop.ShapeProp`` without fake tensors, and quiet on failure."""

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
            raise RuntimeError(f"node '{n.name}' ({n.op} {n.target}) failed: {type(exc).__name__}: {reason}") from exc
        found = False

        def extract(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flatten_outputs(out[k])]
    if isinstance(out, Sequence) and not isinstance(out, (str, bytes)):
        return [t for item in out for t in flatten_outputs(item)]
    return []


def name_prefixes(name: str) -> list[str]:
    """``a.b.c`` -> ``['a', 'a.b', 'a.b.c']``."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def delete_unused_submodules(gm: torch.fx.GraphModule) -> None:
    """What ``GraphModule.delete_all_unused_submodules`` does, with sets: linear in the graph's size.

    A module is used when a node calls it or reads an attribute below it, or when it lies
    on the path to or below such a module.
    """
    used: set[str] = set()
    called: list[str] = []
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            target = str(node.target)
            used.update(name_prefixes(target))
            if node.op == "call_module":
                called.append(target)
    for target in called:
        try:
            used.update(f"{target}.{sub}" for sub, _ in gm.get_submodule(target).named_modules() if sub)
        except AttributeError:  # a node naming a module that does not exist: nothing to keep
            pass
    for name in [n for n, _ in gm.named_modules() if n and n not in used]:
        gm.delete_submodule(name)
