"""A traced sync is never dropped, and a captured one is refused (its call number would replay).

torch.compile: the sync op's schema is functional, so FX dead-code elimination
would remove a call whose outputs are unused, and the peers would wait for a
collective this rank never makes; esper_gate/ops.py marks it side-effectful.
CUDA graphs: seq is a kernel argument of pack, so a replay would resend the
captured call number; pack refuses to run under capture (csrc/cuda/gate_kernels.cu).
"""
import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

import esper_gate

SYNC = (torch.ops.esper_gate.sync, torch.ops.esper_gate.sync.default)


def sync_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SYNC]


@pytest.mark.timeout(300)
def test_compile_keeps_a_sync_whose_outputs_are_unused(one_rank_group):
    name = one_rank_group.group_name
    dynamo_graphs, aot_graphs = [], []

    def record_aot(gm, example_inputs):
        aot_graphs.append(gm)
        return gm.forward

    aot = aot_autograd(fw_compiler=record_aot)

    def backend(gm, example_inputs):
        dynamo_graphs.append(gm)
        return aot(gm, example_inputs)

    def step(votes, stages, targets):
        esper_gate.sync(votes, stages, targets, 1, 7, "unanimous", name)  # outputs unused
        return stages + 1

    torch._dynamo.reset()
    votes = torch.tensor([True, False])
    stages = torch.tensor([3, 4])
    out = torch.compile(step, backend=backend, fullgraph=True)(votes, stages, stages)
    assert out.tolist() == [4, 5]
    assert len(dynamo_graphs) == 1 and len(sync_nodes(dynamo_graphs[0])) == 1, dynamo_graphs[0].graph
    assert len(aot_graphs) == 1 and len(sync_nodes(aot_graphs[0])) == 1, aot_graphs[0].graph
    # and FX's own dead-code elimination leaves it
    gm = aot_graphs[0]
    gm.graph.eliminate_dead_code()
    assert len(sync_nodes(gm)) == 1


def test_sync_is_registered_side_effectful():
    from torch.fx.node import _side_effectful_functions

    for op in SYNC:
        assert op in _side_effectful_functions, op
