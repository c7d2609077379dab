// Reading the reduced buffer: counters, ROOT and lane bits a word at a time,
// and what the counters say about a whole field across all ranks.
//
// The readers take a run of bits (up to 63) or walk the counters in order
// with a cursor, so a field or a whole slot costs one or two word reads and
// no division per bit: decode's per-slot work is a few word operations, not
// one division and one load per record bit.
#pragma once

#include <cstdint>

#include "hd.h"
#include "layout.h"

namespace esper_gate {
namespace wire {

// The 63 bits a ROOT, LANES or counter word uses; bit 63 is never written, so
// a reader ignores it whatever a corrupt sum left there.
constexpr uint64_t kWordBitsMask = (uint64_t{1} << kBitsPerWord) - 1;

// n (0..63) bits from bit g of a bit string stored 63 bits per word from word
// `offset` on: bit k of the result is bit g + k. Reads the one or two words
// the run touches, and none when n is 0.
EG_HD uint64_t section_bits(const int64_t* buf, int64_t offset, int64_t g, int64_t n) {
  if (n <= 0) return 0;
  const int64_t w = g / kBitsPerWord;
  const int64_t shift = g - w * kBitsPerWord;
  uint64_t v = (static_cast<uint64_t>(buf[offset + w]) & kWordBitsMask) >> shift;
  const int64_t have = kBitsPerWord - shift;
  if (n > have) v |= (static_cast<uint64_t>(buf[offset + w + 1]) & kWordBitsMask) << have;
  return low_bits(v, n);
}

// n (0..63) bits of rank 0's record from record bit i.
EG_HD uint64_t root_bits(const int64_t* buf, const Layout& L, int64_t i, int64_t n) {
  return section_bits(buf, L.root_offset, i, n);
}

EG_HD uint64_t root_bit(const int64_t* buf, const Layout& L, int64_t i) { return root_bits(buf, L, i, 1); }

// n (0..63) bits of rank `rank`'s record from record bit i. Only valid when L.exact.
EG_HD uint64_t lane_bits(const int64_t* buf, const Layout& L, int64_t rank, int64_t i, int64_t n) {
  return section_bits(buf, L.lanes_offset, rank * L.record_bits + i, n);
}

EG_HD uint64_t lane_bit(const int64_t* buf, const Layout& L, int64_t rank, int64_t i) {
  return lane_bits(buf, L, rank, i, 1);
}

// Walks counters of COUNTS (or REASONS) in order, one word load per
// counters_per_word counters. A word is loaded only when a counter in it is
// asked for, so a cursor never reads past the last counter it returns.
struct CounterCursor {
  int64_t word;      // the buffer word `bits` came from
  uint64_t bits;     // what is left of that word, the next counter lowest
  int64_t left;      // counters left in `bits`
};

// A cursor at counter `index` of the counters packed from word `first_word` on.
EG_HD CounterCursor counters_at(const int64_t* buf, const Layout& L, int64_t first_word, int64_t index) {
  const int64_t w = index / L.counters_per_word;
  const int64_t k = index - w * L.counters_per_word;
  CounterCursor c;
  c.word = first_word + w;
  c.bits = static_cast<uint64_t>(buf[c.word]) >> (k * L.counter_width);
  c.left = L.counters_per_word - k;
  return c;
}

EG_HD uint64_t next_counter(const int64_t* buf, const Layout& L, CounterCursor* c) {
  if (c->left == 0) {
    ++c->word;
    c->bits = static_cast<uint64_t>(buf[c->word]);
    c->left = L.counters_per_word;
  }
  const uint64_t v = low_bits(c->bits, L.counter_width);
  c->bits >>= L.counter_width;
  --c->left;
  return v;
}

EG_HD uint64_t counter_at(const int64_t* buf, const Layout& L, int64_t i) {
  CounterCursor c = counters_at(buf, L, L.counts_offset, i);
  return next_counter(buf, L, &c);
}

// How many ranks were poisoned for reason code `code` (1..kReasonMax).
EG_HD uint64_t reason_counter_at(const int64_t* buf, const Layout& L, int64_t code) {
  CounterCursor c = counters_at(buf, L, L.reasons_offset, code - 1);
  return next_counter(buf, L, &c);
}

// Only valid when L.exact.
EG_HD uint64_t lane_field(const int64_t* buf, const Layout& L, int64_t rank, int64_t off, int64_t width) {
  return lane_bits(buf, L, rank, off, width);
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

// The next `width` counters of `c` against rank 0's value `root` of the field.
EG_HD FieldSummary summarize_counters(
    const int64_t* buf, const Layout& L, CounterCursor* c, uint64_t root, int64_t width) {
  FieldSummary s{root, 0, 0, 0, true, true};
  const uint64_t W = static_cast<uint64_t>(L.world);
  for (int64_t b = 0; b < width; ++b) {
    const uint64_t n = next_counter(buf, L, c);
    const uint64_t r = (root >> b) & 1u;
    if (n > W || (r == 1 && n == 0) || (r == 0 && n == W)) {
      s.sane = false;
      s.equal = false;
      continue;
    }
    if (n == W) s.all_and |= uint64_t{1} << b;
    if (n > 0) s.any_or |= uint64_t{1} << b;
    if (n != 0 && n != W) s.equal = false;
    const int64_t d = static_cast<int64_t>(r ? W - n : n);
    if (d > s.differ_lb) s.differ_lb = d;
  }
  return s;
}

// The field of `width` bits at record bit `off`.
EG_HD FieldSummary summarize_field(const int64_t* buf, const Layout& L, int64_t off, int64_t width) {
  CounterCursor c = counters_at(buf, L, L.counts_offset, off);
  return summarize_counters(buf, L, &c, root_bits(buf, L, off, width), width);
}

}  // namespace wire
}  // namespace esper_gate
