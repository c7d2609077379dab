"""CUDA kernels, NCCL, no host sync, CUDA graphs. Skipped without a GPU.

benchmarks/gpu_check.sh runs these on a GPU machine.
"""
import random
import time

import pytest
import torch

import esper_gate
from esper_gate import wire
from conftest import requires_cuda
from esper_gate._spawn import spawn_ranks, values
from reference import RankInput, expected
from simulate import simulate

pytestmark = [requires_cuda, pytest.mark.cuda]
CUDA_BUILD = esper_gate.BUILD_INFO.get("build") == "cuda"
needs_cuda_build = pytest.mark.skipif(not CUDA_BUILD, reason="esper_gate was built without CUDA kernels")


def _random_inputs(rng, world, slots, bad=False):
    policy = rng.choice(wire.POLICIES)
    stages = [rng.randrange(64) for _ in range(slots)]
    # half the cases carry the slot state (47-bit slots), the others 13-bit slots
    slot_state = rng.random() < 0.5
    policies = [rng.choice(wire.POLICIES) for _ in range(slots)]
    digests = [rng.randrange(2**32) for _ in range(slots)]
    inputs = []
    for _ in range(world):
        st = list(stages)
        if rng.random() < 0.3:
            st[rng.randrange(slots)] = rng.randrange(64)
        dg = list(digests)
        if rng.random() < 0.2:
            dg[rng.randrange(slots)] ^= 1 << rng.randrange(32)
        inputs.append(RankInput([rng.randrange(2) for _ in range(slots)], st,
                                [rng.randrange(64) if rng.random() < 0.1 else 2 for _ in range(slots)],
                                seq=rng.randrange(2**33), site=rng.randrange(2**32), policy=policy,
                                policies=list(policies) if slot_state else None,
                                digests=dg if slot_state else None))
    if bad:
        inputs[rng.randrange(world)].stages[rng.randrange(slots)] = rng.choice([-3, 64, 500])
    return inputs


@needs_cuda_build
def test_cuda_kernels_equal_cpu_kernels_on_random_inputs():
    rng = random.Random(7)
    for case in range(200):
        world = rng.choice([1, 2, 3, 4, 8, 16, 64, 65, 100])
        slots = rng.choice([1, 2, 7, 16, 33, 256, 1024]) if world <= 64 else rng.choice([1, 16, 100])
        inputs = _random_inputs(rng, world, slots, bad=case % 7 == 0)
        view = rng.randrange(world)
        d_cpu, r_cpu, b_cpu = simulate(inputs, view=view, device="cpu")
        d_gpu, r_gpu, b_gpu = simulate(inputs, view=view, device="cuda")
        assert torch.equal(b_cpu, b_gpu.cpu()), (case, world, slots)
        assert d_cpu == d_gpu and r_cpu == r_gpu, (case, world, slots)
        if world <= 16:
            assert (d_gpu, r_gpu) == expected(inputs, view=view)


@needs_cuda_build
def test_cuda_decode_of_random_buffers_matches_cpu():
    gen = torch.Generator().manual_seed(3)
    for world in (1, 2, 5, 64, 65, 1024):
        for slots in (1, 9, 256):
            for slot_state in (False, True):  # both layouts: the size picks one
                n = wire.buffer_words(slots, world, slot_state)
                buf = torch.randint(-2**63, 2**63 - 1, (n,), dtype=torch.int64, generator=gen)
                for policy in wire.POLICIES:
                    a = esper_gate.decode(buf, slots, world, policy)
                    b = esper_gate.decode(buf.cuda(), slots, world, policy)
                    assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())
    torch.cuda.synchronize()


def test_wrong_device_is_a_clear_error():
    votes = torch.ones(4, dtype=torch.bool, device="cuda")
    stages = torch.zeros(4, dtype=torch.int64)
    # the kernel's own check (TORCH_CHECK_VALUE), not a device guard of the dispatcher
    with pytest.raises(ValueError, match="on one device"):
        esper_gate.pack(votes, stages, stages.cuda(), 0, 0, "any", 0, 1)


@needs_cuda_build
def test_compile_fullgraph_on_cuda():
    def round_trip(votes, stages, targets):
        buf = torch.ops.esper_gate.pack(votes, stages, targets, 1, 2, "any", 0, 1)
        return torch.ops.esper_gate.decode(buf, votes.shape[0], 1, "any")

    votes = torch.tensor([True, False, True], device="cuda")
    stages = torch.tensor([3, 3, 4], device="cuda")
    got = torch.compile(round_trip, fullgraph=True)(votes, stages, stages)
    want = round_trip(votes, stages, stages)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def _nccl_one_rank(rank, world):
    import torch.distributed as dist

    name = dist.group.WORLD.group_name
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    votes = torch.tensor([True, False, True, True], device=dev)
    stages = torch.tensor([3, 3, 4, 6], device=dev)
    targets = torch.tensor([2, 2, 3, 5], device=dev)
    results = {}

    # plain sync
    d, r = esper_gate.sync(votes, stages, targets, 1, 77, "unanimous", name)
    results["plain"] = (d.tolist(), r.tolist())

    # no host sync: queue a long spin, call sync, and see the spin still running
    torch.cuda.synchronize()
    khz = getattr(torch.cuda.get_device_properties(dev), "clock_rate", 0) or 2_000_000
    torch.cuda._sleep(int(0.02 * khz * 1000))  # ~20 ms of spinning: far longer than a sync, so a host sync inside it would show
    spin_done = torch.cuda.Event()
    spin_done.record()
    t0 = time.perf_counter()
    d, r = esper_gate.sync(votes, stages, targets, 2, 77, "unanimous", name)
    host_s = time.perf_counter() - t0
    results["spin_still_running_after_return"] = not spin_done.query()
    results["host_enqueue_s"] = host_s
    torch.cuda.synchronize()
    results["after_spin"] = d.tolist()

    # no host sync inside the op, as torch itself checks it
    torch.cuda.set_sync_debug_mode("error")
    try:
        esper_gate.sync(votes, stages, targets, 4, 77, "unanimous", name)
        results["sync_debug_error_free"] = True
    except RuntimeError as e:
        results["sync_debug_error_free"] = str(e)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    # torch.compile(fullgraph=True) of a function that calls sync on NCCL
    def gate(v, st, tg):
        d, r = torch.ops.esper_gate.sync(v, st, tg, 9, 77, "unanimous", name)
        return d & (st >= 0), r

    got = torch.compile(gate, fullgraph=True)(votes, stages, targets)
    results["compiled"] = (got[0].tolist(), got[1].tolist())

    # capture in a CUDA graph is refused: seq is a kernel argument, so a replay would resend call 3
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            esper_gate.sync(votes, stages, targets, 3, 77, "unanimous", name)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            esper_gate.sync(votes, stages, targets, 3, 77, "unanimous", name)
        results["graph_capture_refused"] = "captured"
    except RuntimeError as e:
        results["graph_capture_refused"] = str(e)
    # the gate still works after the refused capture
    d, r = esper_gate.sync(votes, stages, targets, 5, 77, "unanimous", name)
    results["after_refused_capture"] = d.tolist()
    return results


@needs_cuda_build
@pytest.mark.timeout(120)
def test_nccl_one_rank_sync_no_host_sync_and_cuda_graph():
    (res,) = values(spawn_ranks(_nccl_one_rank, 1, backend="nccl", timeout=100))
    want = expected([RankInput([1, 0, 1, 1], [3, 3, 4, 6], [2, 2, 3, 5], seq=1, site=77)])
    assert res["plain"] == (want[0], want[1])
    assert res["spin_still_running_after_return"], "sync waited for the GPU (host sync inside the op)"
    assert res["after_spin"] == [True, False, True, True]
    assert res["sync_debug_error_free"] is True, res["sync_debug_error_free"]
    want = expected([RankInput([1, 0, 1, 1], [3, 3, 4, 6], [2, 2, 3, 5], seq=9, site=77)])
    assert res["compiled"] == (want[0], want[1])
    assert "refused while the current CUDA stream is capturing a CUDA graph" in res["graph_capture_refused"]
    assert "resend the call number" in res["graph_capture_refused"], res["graph_capture_refused"]
    assert res["after_refused_capture"] == [True, False, True, True]


def _gloo_cuda_ranks(rank, world):
    import torch.distributed as dist

    dev = torch.device("cuda", 0)
    stages = [3, 4, 1, 6]
    if rank == world - 1:
        stages[1] = 3  # diverged
    d, r = esper_gate.sync(torch.tensor([True, True, False, True], device=dev),
                           torch.tensor(stages, device=dev), torch.tensor([2, 3, 0, 5], device=dev),
                           4, 5, "unanimous", dist.group.WORLD.group_name)
    assert d.is_cuda and r.is_cuda
    return d.tolist(), r.tolist()


@needs_cuda_build
@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_gloo_with_cuda_tensors_reports_divergence(world):
    results = values(spawn_ranks(_gloo_cuda_ranks, world, timeout=120))
    inputs = []
    for r in range(world):
        stages = [3, 4, 1, 6]
        if r == world - 1:
            stages[1] = 3
        inputs.append(RankInput([1, 1, 0, 1], stages, [2, 3, 0, 5], seq=4, site=5))
    for rank, got in enumerate(results):
        assert got == expected(inputs, view=rank)
        assert got[0] == [True, False, False, True]


def _gate_stream_ranks(rank, world):
    """The CUDA streams a gate group's and the default group's collectives run on."""
    import datetime
    import json
    import os
    import tempfile

    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from esper_gate._group import new_gate_group

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    # A one-rank GateSync decides locally and builds no group, so build the
    # group it would build, with the same options.
    gate_group = new_gate_group([0], "nccl", dev, datetime.timedelta(seconds=60), "esper_gate.test")
    x = torch.arange(64, dtype=torch.float32, device=dev)
    out = torch.empty_like(x)

    def streams(group) -> set:
        # all_gather into another buffer gives a one-rank NCCL group real GPU
        # work (a copy) on its stream; async_op=True keeps it on that stream.
        dist.all_gather_into_tensor(out, x, group=group, async_op=True).wait()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            dist.all_gather_into_tensor(out, x, group=group, async_op=True).wait()
            torch.cuda.synchronize()
        path = os.path.join(tempfile.mkdtemp(), "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
        return {e["args"]["stream"] for e in events
                if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "stream" in e.get("args", {})}

    return sorted(streams(gate_group)), sorted(streams(dist.group.WORLD))


@needs_cuda_build
@pytest.mark.timeout(120)
def test_gate_group_runs_on_a_stream_of_its_own():
    """The gate's all_reduce must not queue behind gradient traffic on a shared stream."""
    ((gate_streams, default_streams),) = values(spawn_ranks(_gate_stream_ranks, 1, backend="nccl", timeout=100))
    assert gate_streams and default_streams, (gate_streams, default_streams)
    assert not set(gate_streams) & set(default_streams), (gate_streams, default_streams)


@needs_cuda_build
def test_list_inputs_on_cuda_do_not_sync_the_host():
    """Esper's adapter passes lists; turning them into device tensors must not block."""
    dev = torch.device("cuda", 0)
    gs = esper_gate.GateSync(4, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = gs([True, False, 1, 1], [3, 3, 4, 6], [2, 2, 3, 5])
        decisions = res.decisions
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert decisions.is_cuda and decisions.tolist() == [True, False, True, True]


@needs_cuda_build
def test_cpu_tensors_for_a_cuda_gate_are_bad_input():
    gs = esper_gate.GateSync(2, device="cuda")
    with pytest.raises(esper_gate.GateInputError, match="votes is on cpu, expected cuda:0"):
        gs(torch.ones(2, dtype=torch.bool), torch.ones(2, dtype=torch.int64, device="cuda"),
           torch.ones(2, dtype=torch.int64, device="cuda"))


def _two_ranks_one_gpu(rank, world, transport):
    dev = torch.device("cuda", 0)
    try:
        esper_gate.GateSync(4, device=dev, transport=transport)
    except esper_gate.GateConfigError as e:
        return str(e)
    return "built"


@needs_cuda_build
@pytest.mark.timeout(150)
@pytest.mark.parametrize("transport", [None, "c10d"])
def test_two_ranks_on_one_gpu_are_refused_naming_both(transport):
    """NCCL cannot put two ranks of a communicator on one GPU (the owned one would fail at
    init, ProcessGroupNCCL hangs or fails): every CUDA gate refuses at construction, on every
    rank, naming both ranks, the host and the GPU (its UUID, from the rendezvous)."""
    import socket

    said = values(spawn_ranks(_two_ranks_one_gpu, 2, transport, timeout=120))
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    for text in said:
        assert "ranks 0 and 1 are both on cuda:0" in text, text
        assert uuid in text and socket.gethostname() in text, text
