// Where each bit lives: the record (header fields, then one slot record per
// slot: 13 bits, or 47 with the slot state) and the packed buffer built from
// it (fixed words, COUNTS, ROOT, LANES, REASONS).
//
// Every rank writes a *record* into a buffer of int64 words, and the buffer is
// all-reduced once with SUM. Three sections make one SUM give everything:
//   * COUNTS: one small counter per record bit, to which each rank adds its
//     bit. A counter equal to 0 or W means all ranks agree on that bit, so
//     equality of any field, AND/OR and the vote count come out exactly for
//     any world size up to kMaxWorld; a counter needs only bit_length(W) bits.
//   * ROOT: rank 0's record verbatim (others add zeros), for the rank-0 policy
//     and to name "the value the others differ from".
//   * LANES (only for W <= kMaxExactWorld): every rank's record at its own bit
//     offset; the bits are disjoint, so SUM is an OR and the result is an
//     exact gather of all records, which names every rank's stage and target.
//   * REASONS: one counter per reason code 1..kReasonMax, to which a poisoned
//     rank adds 1, so every rank learns every reason with its number of ranks
//     at any world size, also past the lanes (the reason field's counters give
//     only the OR of the codes).
// Three fixed words (presence, rank-id sum, poisoned-rank sum) detect missing,
// duplicated and poisoned contributions. Nothing read from the wire is ever
// used as an index: all offsets derive from (capacity, world, slot state)
// known locally. The slot state (each slot's own policy and state digest) is
// carried only by calls that pass it, and every rank of a call must agree on
// it before the collective, as on the capacity: docs/wire-format.md explains
// why and how, and the design with a worked example.
#pragma once

#include <cstdint>

#include "hd.h"
#include "limits.h"

namespace esper_gate {
namespace wire {

// Header fields, in record bit order.
enum HeaderField : int {
  kFieldSeq = 0,     // caller's call counter, low 32 bits
  kFieldSite = 1,    // call-site / slot-layout fingerprint
  kFieldPolicy = 2,  // Policy
  kFieldSlots = 3,   // number of slots this rank synchronizes
  kFieldWorld = 4,   // world size this rank believes in
  kFieldPoison = 5,  // 1 when this rank's input was bad
  kFieldReason = 6,  // Reason code
  kNumHeaderFields = 7,
};

// Widths are sized from the limits they carry; offsets follow one another.
constexpr int64_t kSeqWidth = 32;
constexpr int64_t kSiteWidth = 32;
constexpr int64_t kPolicyWidth = bits_for(kNumPolicies - 1);
constexpr int64_t kSlotsWidth = bits_for(kMaxSlots);
constexpr int64_t kWorldWidth = bits_for(kMaxWorld);
constexpr int64_t kPoisonWidth = 1;
constexpr int64_t kReasonWidth = bits_for(kReasonMax);

constexpr int64_t kSeqOffset = 0;
constexpr int64_t kSiteOffset = kSeqOffset + kSeqWidth;
constexpr int64_t kPolicyOffset = kSiteOffset + kSiteWidth;
constexpr int64_t kSlotsOffset = kPolicyOffset + kPolicyWidth;
constexpr int64_t kWorldOffset = kSlotsOffset + kSlotsWidth;
constexpr int64_t kPoisonOffset = kWorldOffset + kWorldWidth;
constexpr int64_t kReasonOffset = kPoisonOffset + kPoisonWidth;
constexpr int64_t kHeaderBits = kReasonOffset + kReasonWidth;
// encode_header keeps the header in two 64-bit halves.
static_assert(kHeaderBits <= 128, "the header must fit HeaderBits");
static_assert(kSeqOffset + kSeqWidth <= 64 && kSiteOffset + kSiteWidth <= 64,
              "seq and site must sit in the low half of the header");

EG_HD int64_t field_offset(int f) {
  switch (f) {
    case kFieldSeq: return kSeqOffset;
    case kFieldSite: return kSiteOffset;
    case kFieldPolicy: return kPolicyOffset;
    case kFieldSlots: return kSlotsOffset;
    case kFieldWorld: return kWorldOffset;
    case kFieldPoison: return kPoisonOffset;
    case kFieldReason: return kReasonOffset;
    default: return kHeaderBits;
  }
}

EG_HD int64_t field_width(int f) {
  switch (f) {
    case kFieldSeq: return kSeqWidth;
    case kFieldSite: return kSiteWidth;
    case kFieldPolicy: return kPolicyWidth;
    case kFieldSlots: return kSlotsWidth;
    case kFieldWorld: return kWorldWidth;
    case kFieldPoison: return kPoisonWidth;
    case kFieldReason: return kReasonWidth;
    default: return 0;
  }
}

// The value a field is cut to on the wire: its width in ones.
EG_HD uint64_t field_mask(int f) {
  return (uint64_t{1} << field_width(f)) - 1;
}

// Per slot: bit 0 vote, bits 1..6 stage, bits 7..12 target (the slot's core,
// kSlotCoreBits), then, in a call that carries the slot state, bits 13..14
// the slot's policy and bits 15..46 its state digest. Stage, target, policy
// and digest must be equal on every rank for the slot to be decided. A call
// without the slot state gives every slot its rank's call policy (the
// header's) and digest 0, and pays for neither on the wire.
constexpr int64_t kSlotVoteBit = 0;
constexpr int64_t kSlotStageBit = 1;
constexpr int64_t kSlotTargetBit = kSlotStageBit + kIdBits;
constexpr int64_t kSlotPolicyBit = kSlotTargetBit + kIdBits;
constexpr int64_t kSlotCoreBits = kSlotPolicyBit;
constexpr int64_t kSlotDigestBit = kSlotPolicyBit + kPolicyWidth;
constexpr int64_t kSlotBits = kSlotDigestBit + kDigestBits;  // with the slot state
// encode_slot returns a slot's bits as one uint64_t.
static_assert(kSlotBits <= 64, "a slot record must fit 64 bits");

EG_HD int64_t slot_bits_for(bool slot_state) { return slot_state ? kSlotBits : kSlotCoreBits; }

// Fixed words at the start of the buffer.
constexpr int64_t kWordPresence = 0;     // each rank adds 1
constexpr int64_t kWordRankSum = 1;      // each rank adds rank + 1
constexpr int64_t kWordPoisonRank = 2;   // a poisoned rank adds rank + 1
constexpr int64_t kFixedWords = 3;
// The rank-id sum W(W+1)/2 must not reach the sign bit.
static_assert(kMaxWorld < (int64_t{1} << 31), "the rank-id sum must fit 63 bits");

struct Layout {
  int64_t capacity;           // slots the buffer has room for
  int64_t world;
  bool slot_state;            // slots carry their policy and digest
  int64_t slot_bits;          // slot_bits_for(slot_state)
  int64_t record_bits;        // kHeaderBits + slot_bits * capacity
  int64_t counter_width;      // bits per counter: enough to hold `world`
  int64_t counters_per_word;
  int64_t counts_offset, counts_words;
  int64_t root_offset, root_words;
  int64_t lanes_offset, lanes_words;  // lanes_words == 0 when world > kMaxExactWorld
  int64_t reasons_offset, reasons_words;  // kReasonMax counters, counter_width bits each
  int64_t total_words;
  bool exact;                 // lanes present
};

// bits_for is constexpr; nvcc calls it from device code under
// --expt-relaxed-constexpr, which torch's CUDA extension build passes.
EG_HD int64_t bit_length(int64_t v) { return bits_for(v); }

EG_HD int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The low n bits of v (n in 0..64).
EG_HD uint64_t low_bits(uint64_t v, int64_t n) {
  return n >= 64 ? v : v & ((uint64_t{1} << n) - 1);
}

// Slot capacity of the buffer: the next power of two >= num_slots. Ranks whose
// slot counts differ but round to the same capacity exchange equal-sized
// buffers and are told "slot count mismatch" by the header.
EG_HD int64_t capacity_for(int64_t num_slots) {
  int64_t c = 1;
  while (c < num_slots) c <<= 1;
  return c;
}

EG_HD Layout make_layout(int64_t capacity, int64_t world, bool slot_state) {
  Layout L;
  L.capacity = capacity;
  L.world = world;
  L.slot_state = slot_state;
  L.slot_bits = slot_bits_for(slot_state);
  L.record_bits = kHeaderBits + L.slot_bits * capacity;
  L.counter_width = bit_length(world);
  L.counters_per_word = kBitsPerWord / L.counter_width;
  L.counts_offset = kFixedWords;
  L.counts_words = ceil_div(L.record_bits, L.counters_per_word);
  L.root_offset = L.counts_offset + L.counts_words;
  L.root_words = ceil_div(L.record_bits, kBitsPerWord);
  L.lanes_offset = L.root_offset + L.root_words;
  L.exact = world <= kMaxExactWorld;
  L.lanes_words = L.exact ? ceil_div(world * L.record_bits, kBitsPerWord) : 0;
  L.reasons_offset = L.lanes_offset + L.lanes_words;
  L.reasons_words = ceil_div(kReasonMax, L.counters_per_word);
  L.total_words = L.reasons_offset + L.reasons_words;
  return L;
}

// decode tells the two layouts of a (capacity, world) apart by the reduced
// buffer's size (esper_gate.h, decode_layout), so the slot state must always
// add words. It adds 34 bits per slot to the record, so COUNTS, ROOT and
// LANES never shrink, and COUNTS grows by at least one word at every
// capacity and counter width: checked here for all of them.
constexpr bool slot_state_adds_counter_words() {
  for (int64_t capacity = 1; capacity <= kMaxSlots; capacity <<= 1) {
    for (int64_t width = 1; width <= bits_for(kMaxWorld); ++width) {
      const int64_t per_word = kBitsPerWord / width;
      const int64_t core = kHeaderBits + kSlotCoreBits * capacity;
      const int64_t full = kHeaderBits + kSlotBits * capacity;
      if ((full + per_word - 1) / per_word <= (core + per_word - 1) / per_word) return false;
    }
  }
  return true;
}
static_assert(slot_state_adds_counter_words(), "a buffer with the slot state must be larger than one without");

// Reason code `code` (1..kReasonMax) counts in REASONS at this word and shift.
EG_HD int64_t reason_counter_word(const Layout& L, int64_t code) {
  return L.reasons_offset + (code - 1) / L.counters_per_word;
}
EG_HD int64_t reason_counter_shift(const Layout& L, int64_t code) {
  return ((code - 1) % L.counters_per_word) * L.counter_width;
}

}  // namespace wire
}  // namespace esper_gate
