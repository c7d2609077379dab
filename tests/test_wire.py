"""The Python mirror of the wire layout agrees with the C++ ops."""
import pytest
import torch

import esper_gate
from esper_gate import wire


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 64, 65, 1024])
@pytest.mark.parametrize("slots", [1, 2, 3, 16, 100, 1024])
def test_buffer_and_report_sizes_match_cpp(slots, world):
    ones = torch.ones(slots, dtype=torch.bool)
    ids = torch.zeros(slots, dtype=torch.int64)
    buf = esper_gate.pack(ones, ids, ids, 0, 0, "unanimous", world - 1, world)
    assert buf.dtype == torch.int64 and buf.shape == (wire.buffer_words(slots, world),)
    decision, report = esper_gate.decode(buf * world, slots, world, "unanimous")
    assert decision.shape == (slots,) and decision.dtype == torch.bool
    assert report.shape == (wire.report_words(slots, world),)


def test_buffer_size_depends_only_on_capacity_and_world():
    # 9..16 slots share a capacity, so ranks that disagree on the slot count
    # still exchange equal-sized buffers and are told so by the header.
    sizes = {wire.buffer_words(s, 4) for s in range(9, 17)}
    assert len(sizes) == 1
    assert wire.buffer_words(8, 4) < wire.buffer_words(9, 4)


def test_lanes_only_up_to_64_ranks():
    assert wire.layout(16, 64).lanes_words > 0
    assert wire.layout(16, 65).lanes_words == 0


def test_reason_max_matches_cpp():
    # The fake kernels refuse a poison above wire.REASON_MAX; so must the kernel.
    ones = torch.ones(2, dtype=torch.bool)
    ids = torch.zeros(2, dtype=torch.int64)
    esper_gate.pack(ones, ids, ids, 0, 0, "any", 0, 1, wire.REASON_MAX)
    with pytest.raises(ValueError, match=f"poison must be a reason code in 0..{wire.REASON_MAX}, "
                                         f"got {wire.REASON_MAX + 1}"):
        esper_gate.pack(ones, ids, ids, 0, 0, "any", 0, 1, wire.REASON_MAX + 1)
    assert wire.REASON_MAX == 2 ** dict((n, w) for n, _o, w in wire.HEADER_FIELDS)["reason"] - 1
