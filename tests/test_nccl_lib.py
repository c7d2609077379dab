"""The gate's own NCCL library and communicator (esper_gate/_nccl.py, csrc/nccl), without a GPU.

What a machine without a GPU can settle: the library found is the one torch
loaded, its version check and the message of a mismatch or a second copy, a
unique id made and carried to every rank by the store, the ncclConfig_t that
init passes, and clear errors (not crashes) for a communicator or mapped words
without a GPU. The GPU cases are in benchmarks/gpu_owned_check.py. In a
CPU-only build these tests skip with the reason, except the one that checks
that reason.
"""
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import esper_gate
from esper_gate import _nccl
from esper_gate._spawn import spawn_ranks, values
from esper_gate.errors import GateConfigError

INFO = _nccl.library_info()
needs_nccl = pytest.mark.skipif(not INFO["usable"], reason=f"no usable NCCL: {INFO['why']}")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(esper_gate.__file__)))


def mapped_nccl_paths():
    """Realpaths of every libnccl.so* mapped into this process, read from /proc/self/maps."""
    paths = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and os.path.basename(parts[5]).startswith("libnccl.so"):
                paths.add(os.path.realpath(parts[5]))
    return paths


@pytest.mark.skipif(esper_gate.BUILD_INFO.get("build") == "cuda" and INFO["usable"],
                    reason="a build with NCCL: the reason for its absence is not shown")
def test_without_nccl_every_entry_says_why():
    assert not INFO["usable"] and INFO["why"]
    with pytest.raises(GateConfigError, match="cannot use NCCL: " + INFO["why"][:30]):
        _nccl.check_library()
    with pytest.raises(GateConfigError, match="cannot use NCCL"):
        _nccl.unique_id()


@needs_nccl
def test_library_is_the_one_torch_loaded():
    info = _nccl.check_library()
    maps = mapped_nccl_paths()
    assert maps == {info["path"]}, (maps, info)
    assert info["copies"] == [info["path"]]
    assert info["version"] >= _nccl.MIN_VERSION
    # the library of torch's nvidia-nccl wheel, beside this torch
    nvidia = os.path.realpath(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia"))
    assert info["path"].startswith(nvidia + os.sep), (info["path"], nvidia)


@needs_nccl
def test_an_upgraded_nccl_is_used_and_info_says_the_versions_differ(monkeypatch):
    # torch.cuda.nccl.version() is torch's build-time nccl.h; a user who upgraded the
    # nvidia-nccl wheel runs torch on a newer library, and so must the gate.
    built_with = (2, 27, 3)
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: built_with)
    info = _nccl.check_library()
    assert info["usable"] and info["why"] == ""
    assert info["torch_version"] == built_with and info["version"] == INFO["version"]
    assert "is not the version torch" in info["differs"] and "2.27.3" in info["differs"]
    from esper_gate.__main__ import nccl_lines

    lines = "\n".join(nccl_lines())
    assert "torch NCCL     2.27.3 (torch's build-time nccl.h)" in lines
    assert f"loaded NCCL    {INFO['path']} (version {'.'.join(map(str, INFO['version']))}" in lines
    assert "NCCL versions  differ" in lines and "gate NCCL use  yes" in lines


class _FakeLibraryOps:
    """torch.ops.esper_gate as far as library_info reads it: one loaded copy of ``version``."""

    def __init__(self, version, path="/x/libnccl.so.2"):
        self.raw = {"copies": [path], "path": path, "version": version, "header_version": 23007,
                    "min_version": _nccl.version_code(_nccl.MIN_VERSION), "copy_versions": str(version), "why": ""}

    def nccl_library_info(self):
        return json.dumps(self.raw)


@pytest.mark.parametrize("version, usable", [((2, 13, 4), False), ((2, 14, 0), True), ((2, 28, 9), True),
                                             ((2, 31, 0), True)])
def test_only_a_library_older_than_the_gate_needs_is_refused_whatever_torch_was_built_with(monkeypatch, version,
                                                                                         usable):
    monkeypatch.setattr(_nccl, "_ops", lambda: _FakeLibraryOps(_nccl.version_code(version)))
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 30, 7))
    info = _nccl.library_info()
    assert info["usable"] is usable, info
    if not usable:
        assert "older than the 2.14.0 the gate needs" in info["why"] and "/x/libnccl.so.2" in info["why"]
        with pytest.raises(GateConfigError, match="NCCL 2.13.4, older than the 2.14.0"):
            _nccl.check_library()
    assert bool(info["differs"]) is (version != (2, 30, 7))


@pytest.mark.parametrize("value, refused", [("1", True), (" 1", True), ("0x1", True), ("0", False), ("2", False),
                                            ("yes", False), (None, False)])
def test_nccl_comm_blocking_1_is_refused_naming_the_variable(value, refused):
    env = {} if value is None else {"NCCL_COMM_BLOCKING": value}
    if refused:
        with pytest.raises(GateConfigError, match=re.escape(f"NCCL_COMM_BLOCKING={value} makes every NCCL")):
            _nccl.check_blocking_env(env)
    else:
        _nccl.check_blocking_env(env)


@needs_nccl
@pytest.mark.timeout(120)
def test_a_second_copy_is_refused_naming_both(tmp_path):
    copy = tmp_path / "libnccl.so.2"
    shutil.copyfile(INFO["path"], copy)
    code = textwrap.dedent(f"""
        import ctypes, os
        import esper_gate
        from esper_gate import _nccl
        from esper_gate.errors import GateConfigError
        assert _nccl.library_info()["usable"]
        ctypes.CDLL({str(copy)!r}, mode=os.RTLD_NOW | os.RTLD_LOCAL)
        info = _nccl.library_info()
        print("WHY", info["why"])
        print("COPIES", sorted(info["copies"]))
        try:
            _nccl.unique_id()
        except GateConfigError as e:
            print("REFUSED", e)
    """)
    env = dict(os.environ, PYTHONPATH=PKG_PARENT)
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=100)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    version = _nccl.version_code(INFO["version"])
    assert f"2 copies of NCCL are loaded in this process: {INFO['path']} (version code {version}) and " \
           f"{copy} (version code {version})" in out, out
    assert f"COPIES {sorted([INFO['path'], str(copy)])}" in out
    assert "REFUSED esper_gate cannot use NCCL: 2 copies of NCCL" in out


@needs_nccl
def test_unique_ids_are_128_bytes_and_new_each_time():
    a, b = _nccl.unique_id(), _nccl.unique_id()
    assert isinstance(a, bytes) and len(a) == _nccl.UNIQUE_ID_BYTES == 128
    assert len(b) == 128 and a != b


def _unique_id_through_store(rank, world):
    import torch.distributed as dist

    from esper_gate import _nccl

    store = dist.distributed_c10d._get_default_store()
    if rank == 0:
        store.set("esper_gate/test/nccl_uid", _nccl.unique_id())
    store.wait(["esper_gate/test/nccl_uid"])
    return store.get("esper_gate/test/nccl_uid")


@needs_nccl
@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_unique_id_reaches_every_rank_through_the_store():
    got = values(spawn_ranks(_unique_id_through_store, 3, timeout=100))
    assert len(got) == 3 and len(got[0]) == 128
    assert got[1] == got[0] and got[2] == got[0]


class ConfigV23000(ctypes.Structure):
    # ncclConfig_v23000 of nccl.h (NCCL 2.30.7), written out field by field as an oracle for sizeof.
    _fields_ = [("size", ctypes.c_size_t), ("magic", ctypes.c_uint), ("version", ctypes.c_uint)] + \
        [(n, ctypes.c_int) for n in ("blocking", "cgaClusterSize", "minCTAs", "maxCTAs")] + \
        [("netName", ctypes.c_char_p), ("splitShare", ctypes.c_int), ("trafficClass", ctypes.c_int),
         ("commName", ctypes.c_char_p)] + \
        [(n, ctypes.c_int) for n in ("collnetEnable", "CTAPolicy", "shrinkShare", "nvlsCTAs",
                                     "nChannelsPerNetPeer", "nvlinkCentricSched", "graphUsageMode",
                                     "numRmaCtx", "maxP2pPeers", "graphStreamOrdering")]


@needs_nccl
def test_config_is_filled_for_the_loaded_version():
    c = _nccl.config_probe()
    assert c["magic"] == 0xCAFEBEEF  # NCCL_API_MAGIC
    assert c["version"] == c["header_version"] == _nccl.version_code(INFO["header_version"])
    assert c["version"] <= _nccl.version_code(INFO["version"]), "the library is older than the config it gets"
    assert c["blocking"] == 0, "init must be non-blocking"
    undef = -(2 ** 31)  # NCCL_CONFIG_UNDEF_INT: NCCL's default
    assert c["undef_int"] == undef
    fields = ["cgaClusterSize", "minCTAs", "maxCTAs", "splitShare"]
    if INFO["header_version"] >= (2, 27, 0):  # ncclConfig_v22700
        fields += ["trafficClass", "collnetEnable", "CTAPolicy", "shrinkShare", "nvlsCTAs"]
        assert c["commName"] == "esper_gate"
    for field in fields:
        assert c[field] == undef, field
    if INFO["header_version"] == (2, 30, 7):
        assert c["size"] == ctypes.sizeof(ConfigV23000)


@needs_nccl
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_a_communicator_without_a_gpu_is_a_clear_error():
    uid = _nccl.unique_id()
    with pytest.raises(GateConfigError, match=r"NcclComm: no CUDA device is visible to this process .*cuda:0"):
        _nccl.NcclComm(uid, 0, 1, torch.device("cuda", 0))
    with pytest.raises(GateConfigError, match=r"MappedWords: no CUDA device is visible"):
        _nccl.MappedWords(2, "cuda:0")
    # the C++ check behind the Python one
    with pytest.raises(RuntimeError, match="no CUDA device is usable in this process"):
        torch.ops.esper_gate.nccl_comm_init(torch.frombuffer(bytearray(uid), dtype=torch.uint8), 0, 1, 0)


@needs_nccl
@pytest.mark.parametrize("args, says", [
    ((b"x" * 7, 0, 1, "cuda:0"), "unique_id must be the 128 bytes of unique_id(), got 7 bytes"),
    ((b"x" * 128, 2, 2, "cuda:0"), "rank 2 is not in a world of 2"),
    ((b"x" * 128, 0, 1, "cpu"), "needs a CUDA device, got cpu"),
])
def test_bad_communicator_arguments_name_the_value(args, says):
    with pytest.raises((ValueError, GateConfigError), match=says.replace("(", r"\(").replace(")", r"\)")):
        _nccl.NcclComm(*args)


def test_info_command_names_the_nccl_library():
    env = dict(os.environ, PYTHONPATH=PKG_PARENT)
    p = subprocess.run([sys.executable, "-m", "esper_gate", "info"], cwd=PKG_PARENT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "torch NCCL" in p.stdout and "(torch's build-time nccl.h)" in p.stdout
    if INFO["usable"]:
        assert f"loaded NCCL    {INFO['path']} (version {'.'.join(map(str, INFO['version']))}" in p.stdout
        assert "gate NCCL use  yes" in p.stdout
    else:
        assert f"gate NCCL use  no: {INFO['why']}" in p.stdout


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")


@needs_nccl
@needs_gpu
@pytest.mark.timeout(60)
def test_world_of_one_all_reduces_in_place_and_ends_cleanly():
    import time

    dev = torch.device("cuda", 0)
    comm = _nccl.NcclComm(_nccl.unique_id(), 0, 1, dev)
    t0 = time.monotonic()
    while comm.state() == "pending" and time.monotonic() - t0 < 30:
        time.sleep(0.001)
    assert comm.state() == "ready"
    x = torch.arange(5, dtype=torch.int64, device=dev) * 3
    assert comm.all_reduce_(x) is x
    assert x.tolist() == [0, 3, 6, 9, 12]
    with pytest.raises(RuntimeError, match="contiguous int64"):
        comm.all_reduce_(torch.ones(3, device=dev))
    assert comm.destroy() == "destroyed" and comm.state() == "destroyed"
    comm.close()
    comm.close()
    with pytest.raises(GateConfigError, match="closed"):
        comm.state()


@needs_nccl
@needs_gpu
def test_mapped_words_are_one_memory_seen_from_host_and_device():
    w = _nccl.MappedWords(3, "cuda:0")
    assert w.host.device.type == "cpu" and w.device.device == torch.device("cuda", 0)
    assert w.host.tolist() == [0, 0, 0]
    w.host[0] = 41
    w.device[1:2].copy_(w.device[0:1] + 1)  # a kernel reads the host's write and writes back
    torch.cuda.synchronize()
    assert w.host.tolist() == [41, 42, 0]
