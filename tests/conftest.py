import importlib.util
import os
import shutil
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# torch.compile's on-disk cache (default /tmp/torchinductor_$USER, shared by every
# checkout and run on the machine) does not key on a custom op's output sizes: a
# graph compiled against an older build of the ops would be replayed with the
# old sizes. Each test session compiles into a cache of its own.
_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="esper_gate_inductor_")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE


def pytest_unconfigure(config):
    shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_locate():
    # By path: importing esper_gate here would already pick the copy under test.
    spec = importlib.util.spec_from_file_location("_esper_gate_locate", os.path.join(ROOT, "esper_gate", "_locate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# An unbuilt checkout next to a non-editable install (`pip install --no-build-isolation .`):
# `python -m pytest` puts the checkout first on sys.path, where it would hide the
# build. Test the installed build instead, and say so in the report header.
INSTALLED = _load_locate().shadowed_copy(os.path.join(ROOT, "esper_gate"))
if INSTALLED:
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.realpath(ROOT)]
# These start fresh interpreters inside the checkout, where the unbuilt tree comes first again.
RUNS_IN_CHECKOUT = ("test_demo.py", "test_bench.py")


def pytest_report_header(config):
    try:
        import esper_gate
    except ImportError as e:  # the test modules fail with the same message; say it once up front
        return f"esper_gate cannot be imported: {e}"
    where = os.path.dirname(os.path.abspath(esper_gate.__file__))
    line = f"esper_gate under test: {where} ({esper_gate.BUILD_INFO.get('build')} build)"
    if INSTALLED:
        line += (f"; the checkout {ROOT} is not built, so this is the installed copy and edits in the "
                 f"checkout are not tested (`pip install --no-build-isolation -e .` tests them)")
    return line


def pytest_collection_modifyitems(config, items):
    if not INSTALLED:
        return
    skip = pytest.mark.skip(reason=f"runs python inside the checkout {ROOT}, whose unbuilt esper_gate would "
                                   f"hide the installed copy {INSTALLED}; build the checkout "
                                   f"(`pip install --no-build-isolation -e .`) to run it")
    for item in items:
        if os.path.basename(str(item.fspath)) in RUNS_IN_CHECKOUT:
            item.add_marker(skip)

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; none is visible on this machine")


@pytest.fixture
def one_rank_group():
    """A one-rank gloo world in this process, torn down afterwards."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    # An in-process store: no port to pick, so nothing else on the machine can
    # take it between the pick and the bind (EADDRINUSE seen in a loaded CI run).
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
