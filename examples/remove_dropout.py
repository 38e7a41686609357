"""An example graphopt plugin: a pass that removes eval-mode Dropout and Identity layers.

Use it with:

    graphopt compile zoo:mobilenet_v2 --plugin examples/remove_dropout.py \
        --pipeline "remove-dropout,fuse-conv-bn-relu,dce"

A plugin is any Python module; every function decorated with ``@register_pass`` in it
becomes a pass. Options are keyword-only parameters with types and defaults, set from
the pipeline text: ``remove-dropout{keep-identity=true}``.
"""

from __future__ import annotations

from torch import nn

from graphopt import PassResult, Program, register_pass


@register_pass("remove-dropout", contract="exact")
def remove_dropout(program: Program, *, keep_identity: bool = False) -> PassResult:
    """Remove Dropout layers that are in eval mode (they compute the identity), and Identity layers."""
    gm = program.graph_module
    removable = (nn.Dropout, nn.Dropout1d, nn.Dropout2d) + (() if keep_identity else (nn.Identity,))
    removed = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, removable) and not module.training and len(node.args) == 1:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed.append(node.target)
    # The modules themselves are now unused: the `dce` pass deletes them.
    return PassResult(changed=bool(removed), detail=f"removed {len(removed)} layers", data={"removed": removed})
