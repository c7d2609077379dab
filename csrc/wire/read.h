// Reading the reduced buffer: single counters and bits, and what the counters
// say about a whole field across all ranks.
#pragma once

#include <cstdint>

#include "hd.h"
#include "layout.h"

namespace esper_gate {
namespace wire {

EG_HD uint64_t counter_at(const int64_t* buf, const Layout& L, int64_t i) {
  const uint64_t word = static_cast<uint64_t>(buf[L.counts_offset + i / L.counters_per_word]);
  const uint64_t mask = (uint64_t{1} << L.counter_width) - 1;
  return (word >> ((i % L.counters_per_word) * L.counter_width)) & mask;
}

EG_HD uint64_t root_bit(const int64_t* buf, const Layout& L, int64_t i) {
  const uint64_t word = static_cast<uint64_t>(buf[L.root_offset + i / kBitsPerWord]);
  return (word >> (i % kBitsPerWord)) & 1u;
}

// How many ranks were poisoned for reason code `code` (1..kReasonMax).
EG_HD uint64_t reason_counter_at(const int64_t* buf, const Layout& L, int64_t code) {
  const uint64_t word = static_cast<uint64_t>(buf[reason_counter_word(L, code)]);
  const uint64_t mask = (uint64_t{1} << L.counter_width) - 1;
  return (word >> reason_counter_shift(L, code)) & mask;
}

// Only valid when L.exact.
EG_HD uint64_t lane_bit(const int64_t* buf, const Layout& L, int64_t rank, int64_t i) {
  const int64_t g = rank * L.record_bits + i;
  const uint64_t word = static_cast<uint64_t>(buf[L.lanes_offset + g / kBitsPerWord]);
  return (word >> (g % kBitsPerWord)) & 1u;
}

EG_HD uint64_t lane_field(const int64_t* buf, const Layout& L, int64_t rank, int64_t off, int64_t width) {
  uint64_t v = 0;
  for (int64_t b = 0; b < width; ++b) v |= lane_bit(buf, L, rank, off + b) << b;
  return v;
}

// What the counters say about one multi-bit field across all ranks.
struct FieldSummary {
  uint64_t root;      // rank 0's value
  uint64_t all_and;   // bits set on every rank: a lower bound of every value
  uint64_t any_or;    // bits set on some rank: an upper bound of every value
  int64_t differ_lb;  // ranks whose value differs from rank 0's: at least this many
  bool equal;         // every rank holds the same value
  bool sane;          // counters consistent with each other and with ROOT
};

EG_HD FieldSummary summarize_field(const int64_t* buf, const Layout& L, int64_t off, int64_t width) {
  FieldSummary s{0, 0, 0, 0, true, true};
  const uint64_t W = static_cast<uint64_t>(L.world);
  for (int64_t b = 0; b < width; ++b) {
    const uint64_t c = counter_at(buf, L, off + b);
    const uint64_t r = root_bit(buf, L, off + b);
    s.root |= r << b;
    if (c > W || (r == 1 && c == 0) || (r == 0 && c == W)) {
      s.sane = false;
      s.equal = false;
      continue;
    }
    if (c == W) s.all_and |= uint64_t{1} << b;
    if (c > 0) s.any_or |= uint64_t{1} << b;
    if (c != 0 && c != W) s.equal = false;
    const int64_t d = static_cast<int64_t>(r ? W - c : c);
    if (d > s.differ_lb) s.differ_lb = d;
  }
  return s;
}

}  // namespace wire
}  // namespace esper_gate
