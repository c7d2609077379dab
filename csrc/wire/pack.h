// One rank's contribution: the header and slot bits of its record, and the
// buffer words built from them (layout.h says where each bit goes).
#pragma once

#include <cstdint>

#include "hd.h"
#include "layout.h"
#include "limits.h"

namespace esper_gate {
namespace wire {

// The header as a kHeaderBits-bit string (lo = bits 0..63, hi = the rest).
struct HeaderBits {
  uint64_t lo;
  uint64_t hi;
};

struct HeaderValues {
  uint64_t seq;     // already reduced to the field's width
  uint64_t site;
  uint64_t policy;
  uint64_t slots;
  uint64_t world;
  uint64_t poison;
  uint64_t reason;
};

EG_HD uint64_t header_value(const HeaderValues& h, int f) {
  switch (f) {
    case kFieldSeq: return h.seq;
    case kFieldSite: return h.site;
    case kFieldPolicy: return h.policy;
    case kFieldSlots: return h.slots;
    case kFieldWorld: return h.world;
    case kFieldPoison: return h.poison;
    case kFieldReason: return h.reason;
    default: return 0;
  }
}

EG_HD HeaderBits encode_header(const HeaderValues& h) {
  HeaderBits out{0, 0};
  for (int f = 0; f < kNumHeaderFields; ++f) {
    const int64_t off = field_offset(f);
    const int64_t width = field_width(f);
    const uint64_t v = header_value(h, f) & field_mask(f);
    for (int64_t b = 0; b < width; ++b) {
      const int64_t i = off + b;
      const uint64_t bit = (v >> b) & 1u;
      if (i < 64) {
        out.lo |= bit << i;
      } else {
        out.hi |= bit << (i - 64);
      }
    }
  }
  return out;
}

// The poison bit and the reason code of an encoded header.
static_assert(kPoisonOffset >= 64 && kReasonOffset >= 64, "poison and reason sit in the high half");
EG_HD uint64_t header_poison(const HeaderBits& h) {
  return (h.hi >> (kPoisonOffset - 64)) & field_mask(kFieldPoison);
}
EG_HD uint64_t header_reason(const HeaderBits& h) {
  return (h.hi >> (kReasonOffset - 64)) & field_mask(kFieldReason);
}

// A vote as the kernels read it. Bool votes are read as bytes and any
// non-zero byte is a yes, as torch treats bool storage (a uint8 tensor viewed
// as bool may hold 2); reading such a byte through `bool` is undefined.
EG_HD int64_t vote_value(const uint8_t* bool_votes, int64_t s) { return bool_votes[s] != 0 ? 1 : 0; }
EG_HD int64_t vote_value(const int64_t* int_votes, int64_t s) { return int_votes[s]; }

// One slot's kSlotBits record bits. Out-of-range values are masked to their
// field width (so they can never spill into a neighbour) and reported in
// *reason, checked in the order vote, stage, target, policy, digest.
EG_HD uint64_t encode_slot(
    int64_t vote, int64_t stage, int64_t target, int64_t policy, int64_t digest, int64_t* reason) {
  *reason = kReasonNone;
  if (vote != 0 && vote != 1) {
    *reason = kReasonVote;
  } else if (stage < 0 || stage > kMaxId) {
    *reason = kReasonStage;
  } else if (target < 0 || target > kMaxId) {
    *reason = kReasonTarget;
  } else if (policy < 0 || policy >= kNumPolicies) {
    *reason = kReasonPolicy;
  } else if (digest < 0 || digest > static_cast<int64_t>(kDigestMask)) {
    *reason = kReasonDigest;
  }
  const uint64_t v = static_cast<uint64_t>(vote) & 1u;
  const uint64_t s = static_cast<uint64_t>(stage) & kMaxId;
  const uint64_t t = static_cast<uint64_t>(target) & kMaxId;
  const uint64_t p = static_cast<uint64_t>(policy) & field_mask(kFieldPolicy);
  const uint64_t d = static_cast<uint64_t>(digest) & kDigestMask;
  return (v << kSlotVoteBit) | (s << kSlotStageBit) | (t << kSlotTargetBit) | (p << kSlotPolicyBit) |
         (d << kSlotDigestBit);
}

// n (0..63) bits of a rank's record from record bit i: bit k of the result
// is record bit i + k. Each slot takes the low slot_bits of its record (the
// core alone when the call carries no slot state). Slots at or past
// num_slots (capacity padding) are all zeros. A run touches the header halves and at most a few slot records, so a
// buffer word costs a few shifts, not one call per bit.
EG_HD uint64_t record_bits(
    const HeaderBits& h, const uint64_t* slot_records, int64_t num_slots, int64_t slot_bits, int64_t i,
    int64_t n) {
  uint64_t v = 0;
  int64_t got = 0;
  while (got < n && i + got < kHeaderBits) {
    const int64_t at = i + got;
    const uint64_t from = at < 64 ? h.lo >> at : h.hi >> (at - 64);
    const int64_t avail = (at < 64 ? 64 : kHeaderBits) - at;
    const int64_t take = avail < n - got ? avail : n - got;
    v |= low_bits(from, take) << got;
    got += take;
  }
  if (got < n) {
    const int64_t j = i + got - kHeaderBits;
    int64_t s = j / slot_bits;
    int64_t b = j - s * slot_bits;
    while (got < n) {
      const int64_t take = slot_bits - b < n - got ? slot_bits - b : n - got;
      if (s < num_slots) v |= low_bits(slot_records[s] >> b, take) << got;
      got += take;
      ++s;
      b = 0;
    }
  }
  return v;
}

EG_HD uint64_t record_bit(
    const HeaderBits& h, const uint64_t* slot_records, int64_t num_slots, int64_t slot_bits, int64_t i) {
  return record_bits(h, slot_records, num_slots, slot_bits, i, 1);
}

// The low n bits of `bits` spread out to one counter each, `width` bits apart.
EG_HD uint64_t spread_to_counters(uint64_t bits, int64_t n, int64_t width) {
  if (width == 1) return bits;
  uint64_t v = 0;
  for (int64_t k = 0; k < n; ++k) v |= ((bits >> k) & 1u) << (k * width);
  return v;
}

// Word w of this rank's contribution. Each output word is a pure function of
// the inputs, so the words can be spread over threads with no atomics.
EG_HD int64_t pack_word(
    const Layout& L, const HeaderBits& h, const uint64_t* slot_records, int64_t num_slots,
    int64_t rank, bool poisoned, int64_t w) {
  if (w == kWordPresence) return 1;
  if (w == kWordRankSum) return rank + 1;
  if (w == kWordPoisonRank) return poisoned ? rank + 1 : 0;
  if (w < L.root_offset) {
    const int64_t first = (w - L.counts_offset) * L.counters_per_word;
    const int64_t left = L.record_bits - first;
    const int64_t n = left < L.counters_per_word ? left : L.counters_per_word;
    return static_cast<int64_t>(
        spread_to_counters(record_bits(h, slot_records, num_slots, L.slot_bits, first, n), n, L.counter_width));
  }
  if (w < L.lanes_offset) {
    if (rank != 0) return 0;
    const int64_t first = (w - L.root_offset) * kBitsPerWord;
    const int64_t left = L.record_bits - first;
    return static_cast<int64_t>(
        record_bits(h, slot_records, num_slots, L.slot_bits, first, left < kBitsPerWord ? left : kBitsPerWord));
  }
  if (w < L.reasons_offset) {
    // The part of this rank's lane [rank * R, rank * R + R) in the word's bits.
    const int64_t lo = (w - L.lanes_offset) * kBitsPerWord;
    const int64_t hi = lo + kBitsPerWord;
    const int64_t mine_lo = rank * L.record_bits;
    const int64_t mine_hi = mine_lo + L.record_bits;
    const int64_t a = lo > mine_lo ? lo : mine_lo;
    const int64_t b = hi < mine_hi ? hi : mine_hi;
    if (a >= b) return 0;
    return static_cast<int64_t>(record_bits(h, slot_records, num_slots, L.slot_bits, a - mine_lo, b - a)
                                << (a - lo));
  }
  if (w < L.total_words) {
    // The reason as the header carries it, so REASONS and the reason field
    // never disagree; a rank whose poison bit is clear counts under no reason.
    const int64_t code = static_cast<int64_t>(header_reason(h));
    if (header_poison(h) == 0 || code == kReasonNone || reason_counter_word(L, code) != w) return 0;
    return static_cast<int64_t>(uint64_t{1} << reason_counter_shift(L, code));
  }
  return 0;
}

// The lowest bad slot with its reason, as one int that a min finds: slot
// times kBadSlotStride plus the reason code.
constexpr int kBadSlotStride = int{1} << kReasonWidth;
constexpr int kNoBadSlot = 0x7fffffff;
static_assert(kMaxSlots * kBadSlotStride < kNoBadSlot, "bad-slot codes must stay below kNoBadSlot");

// A caller-declared reason wins; otherwise the first bad slot poisons the header.
EG_HD void apply_bad_slot(HeaderValues* header, int first_bad) {
  if (header->reason == kReasonNone && first_bad != kNoBadSlot) {
    header->reason = static_cast<uint64_t>(first_bad % kBadSlotStride);
    header->poison = 1;
  }
}

// State the pack workers share (shared memory on the device).
struct PackShared {
  int first_bad;
  int poisoned;
  HeaderBits bits;
};

// The whole pack of one rank: encode the slots (finding the first bad one),
// settle the header, then write every buffer word. policies and digests may
// be null: every slot then has the header's policy, and digest 0. Their
// values are checked (a bad one poisons) whatever the layout, but only a
// layout with the slot state sends them; the ops build that layout exactly
// when either is given (esper_gate.h, pack_call). records has room for
// num_slots entries; out for L.total_words. Loop is a policy from loops.h.
template <typename Loop, typename VoteT>
EG_HD void pack_buffer(
    const Loop& loop, const VoteT* votes, const int64_t* stages, const int64_t* targets,
    const int64_t* policies, const int64_t* digests, int64_t num_slots, HeaderValues header,
    const Layout& L, int64_t rank, uint64_t* records, PackShared* sh, int64_t* out) {
  if (loop.leader()) sh->first_bad = kNoBadSlot;
  loop.sync();
  const int64_t default_policy = static_cast<int64_t>(header.policy);
  loop.for_each(num_slots, [&](int64_t s) {
    int64_t reason = kReasonNone;
    records[s] = encode_slot(vote_value(votes, s), stages[s], targets[s],
                             policies != nullptr ? policies[s] : default_policy,
                             digests != nullptr ? digests[s] : 0, &reason);
    if (reason != kReasonNone) loop.min_into(&sh->first_bad, static_cast<int>(s * kBadSlotStride + reason));
  });
  loop.sync();
  if (loop.leader()) {
    apply_bad_slot(&header, sh->first_bad);
    sh->bits = encode_header(header);
    sh->poisoned = header.poison != 0 ? 1 : 0;
  }
  loop.sync();
  loop.for_each(L.total_words, [&](int64_t w) {
    out[w] = pack_word(L, sh->bits, records, num_slots, rank, sh->poisoned != 0, w);
  });
}

}  // namespace wire
}  // namespace esper_gate
