// The esper_gate wire format: the one place that knows which bit means what.
//
// Every function here is compiled twice, for the host (CPU kernels, C++ unit
// tests) and for the device (CUDA kernels), so the CPU tests cover the exact
// bit logic the GPU runs. docs/wire-format.md explains the design with a
// worked example; keep the two in step.
//
// Design in one paragraph: every rank writes a *record* (a fixed string of
// bits: a call header plus 13 bits per slot) into a buffer of int64 words, and
// the buffer is all-reduced once with SUM. Three sections make one SUM give
// everything:
//   * COUNTS: one small counter per record bit, to which each rank adds its
//     bit. A counter equal to 0 or W means all ranks agree on that bit, so
//     equality of any field, AND/OR and the vote count come out exactly for
//     any world size up to 1024.
//   * ROOT: rank 0's record verbatim (others add zeros), for the rank-0 policy
//     and to name "the value the others differ from".
//   * LANES (only for W <= 64): every rank's record at its own bit offset; the
//     bits are disjoint, so SUM is an OR and the result is an exact gather of
//     all records, which names every rank's stage and target.
// Three fixed words (presence, rank-id sum, poisoned-rank sum) detect missing,
// duplicated and poisoned contributions. Nothing read from the wire is ever
// used as an index: all offsets derive from (capacity, world) known locally.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EG_HD __host__ __device__ __forceinline__
#else
#define EG_HD inline
#endif

namespace esper_gate {
namespace wire {

// ---- limits --------------------------------------------------------------
constexpr int64_t kMaxSlots = 1024;
constexpr int64_t kMaxWorld = 1024;
constexpr int64_t kMaxExactWorld = 64;  // lanes (exact per-rank report) up to here
constexpr int64_t kMaxId = 63;          // stage and target ids are 0..63
constexpr int64_t kIdBits = 6;
constexpr int64_t kBitsPerWord = 63;    // the sign bit is never used

// ---- policies ------------------------------------------------------------
enum Policy : int64_t {
  kUnanimous = 0,
  kRank0 = 1,
  kMajority = 2,
  kAny = 3,
};
constexpr int64_t kNumPolicies = 4;

// ---- bad-input reason codes (5 bits on the wire) -------------------------
// 1..15 are found by the pack kernel; 16..31 are declared by the caller
// (the Python wrapper validates dtypes and shapes and passes its code).
enum Reason : int64_t {
  kReasonNone = 0,
  kReasonVote = 1,      // a vote that is neither 0 nor 1
  kReasonStage = 2,     // a stage id outside 0..63
  kReasonTarget = 3,    // a target id outside 0..63
  kReasonSite = 4,      // a site fingerprint outside 0..2^32-1
  kReasonCallerMin = 16,
  kReasonMax = 31,
};

// ---- the record ----------------------------------------------------------
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

EG_HD int64_t field_offset(int f) {
  switch (f) {
    case kFieldSeq: return 0;
    case kFieldSite: return 32;
    case kFieldPolicy: return 64;
    case kFieldSlots: return 66;
    case kFieldWorld: return 77;
    case kFieldPoison: return 88;
    case kFieldReason: return 89;
    default: return 94;
  }
}

EG_HD int64_t field_width(int f) {
  switch (f) {
    case kFieldSeq: return 32;
    case kFieldSite: return 32;
    case kFieldPolicy: return 2;
    case kFieldSlots: return 11;
    case kFieldWorld: return 11;
    case kFieldPoison: return 1;
    case kFieldReason: return 5;
    default: return 0;
  }
}

constexpr int64_t kHeaderBits = 94;
// Per slot: bit 0 vote, bits 1..6 stage, bits 7..12 target.
constexpr int64_t kSlotBits = 13;
constexpr int64_t kSlotVoteBit = 0;
constexpr int64_t kSlotStageBit = 1;
constexpr int64_t kSlotTargetBit = 7;

// Fixed words at the start of the buffer.
constexpr int64_t kWordPresence = 0;     // each rank adds 1
constexpr int64_t kWordRankSum = 1;      // each rank adds rank + 1
constexpr int64_t kWordPoisonRank = 2;   // a poisoned rank adds rank + 1
constexpr int64_t kFixedWords = 3;

struct Layout {
  int64_t capacity;           // slots the buffer has room for
  int64_t world;
  int64_t record_bits;        // kHeaderBits + kSlotBits * capacity
  int64_t counter_width;      // bits per counter: enough to hold `world`
  int64_t counters_per_word;
  int64_t counts_offset, counts_words;
  int64_t root_offset, root_words;
  int64_t lanes_offset, lanes_words;  // lanes_words == 0 when world > 64
  int64_t total_words;
  bool exact;                 // lanes present
};

EG_HD int64_t bit_length(int64_t v) {
  int64_t n = 0;
  while (v > 0) {
    ++n;
    v >>= 1;
  }
  return n;
}

EG_HD int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Slot capacity of the buffer: the next power of two >= num_slots. Ranks whose
// slot counts differ but round to the same capacity exchange equal-sized
// buffers and are told "slot count mismatch" by the header.
EG_HD int64_t capacity_for(int64_t num_slots) {
  int64_t c = 1;
  while (c < num_slots) c <<= 1;
  return c;
}

EG_HD Layout make_layout(int64_t capacity, int64_t world) {
  Layout L;
  L.capacity = capacity;
  L.world = world;
  L.record_bits = kHeaderBits + kSlotBits * capacity;
  L.counter_width = bit_length(world);
  L.counters_per_word = kBitsPerWord / L.counter_width;
  L.counts_offset = kFixedWords;
  L.counts_words = ceil_div(L.record_bits, L.counters_per_word);
  L.root_offset = L.counts_offset + L.counts_words;
  L.root_words = ceil_div(L.record_bits, kBitsPerWord);
  L.lanes_offset = L.root_offset + L.root_words;
  L.exact = world <= kMaxExactWorld;
  L.lanes_words = L.exact ? ceil_div(world * L.record_bits, kBitsPerWord) : 0;
  L.total_words = L.lanes_offset + L.lanes_words;
  return L;
}

// ---- packing -------------------------------------------------------------
// The header as a 94-bit string (lo = bits 0..63, hi = bits 64..93).
struct HeaderBits {
  uint64_t lo;
  uint64_t hi;
};

struct HeaderValues {
  uint64_t seq;     // already reduced to 32 bits
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
    const uint64_t v = header_value(h, f) & ((uint64_t{1} << width) - 1);
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

// One slot's 13 record bits. Out-of-range values are masked to their field
// width (so they can never spill into a neighbour) and reported in *reason.
// A vote as the kernels read it. Bool votes are read as bytes and any
// non-zero byte is a yes, as torch treats bool storage (a uint8 tensor viewed
// as bool may hold 2); reading such a byte through `bool` is undefined.
EG_HD int64_t vote_value(const uint8_t* bool_votes, int64_t s) { return bool_votes[s] != 0 ? 1 : 0; }
EG_HD int64_t vote_value(const int64_t* int_votes, int64_t s) { return int_votes[s]; }

EG_HD uint32_t encode_slot(int64_t vote, int64_t stage, int64_t target, int64_t* reason) {
  *reason = kReasonNone;
  if (vote != 0 && vote != 1) {
    *reason = kReasonVote;
  } else if (stage < 0 || stage > kMaxId) {
    *reason = kReasonStage;
  } else if (target < 0 || target > kMaxId) {
    *reason = kReasonTarget;
  }
  const uint64_t v = static_cast<uint64_t>(vote) & 1u;
  const uint64_t s = static_cast<uint64_t>(stage) & kMaxId;
  const uint64_t t = static_cast<uint64_t>(target) & kMaxId;
  return static_cast<uint32_t>((v << kSlotVoteBit) | (s << kSlotStageBit) | (t << kSlotTargetBit));
}

// Bit i of a rank's record. Slots at or past num_slots (capacity padding)
// are all zeros.
EG_HD uint64_t record_bit(const HeaderBits& h, const uint32_t* slot_records, int64_t num_slots, int64_t i) {
  if (i < 64) return (h.lo >> i) & 1u;
  if (i < kHeaderBits) return (h.hi >> (i - 64)) & 1u;
  const int64_t j = i - kHeaderBits;
  const int64_t s = j / kSlotBits;
  if (s >= num_slots) return 0;
  return (slot_records[s] >> (j % kSlotBits)) & 1u;
}

// Word w of this rank's contribution. Each output word is a pure function of
// the inputs, so the CUDA kernel gives each thread its own words (no atomics)
// and the CPU kernel loops over them.
EG_HD int64_t pack_word(
    const Layout& L, const HeaderBits& h, const uint32_t* slot_records, int64_t num_slots,
    int64_t rank, bool poisoned, int64_t w) {
  if (w == kWordPresence) return 1;
  if (w == kWordRankSum) return rank + 1;
  if (w == kWordPoisonRank) return poisoned ? rank + 1 : 0;
  uint64_t v = 0;
  if (w < L.root_offset) {
    const int64_t first = (w - L.counts_offset) * L.counters_per_word;
    for (int64_t k = 0; k < L.counters_per_word; ++k) {
      const int64_t i = first + k;
      if (i >= L.record_bits) break;
      v |= record_bit(h, slot_records, num_slots, i) << (k * L.counter_width);
    }
    return static_cast<int64_t>(v);
  }
  if (w < L.lanes_offset) {
    if (rank != 0) return 0;
    const int64_t first = (w - L.root_offset) * kBitsPerWord;
    for (int64_t k = 0; k < kBitsPerWord; ++k) {
      const int64_t i = first + k;
      if (i >= L.record_bits) break;
      v |= record_bit(h, slot_records, num_slots, i) << k;
    }
    return static_cast<int64_t>(v);
  }
  if (w < L.total_words) {
    const int64_t lo = (w - L.lanes_offset) * kBitsPerWord;
    const int64_t hi = lo + kBitsPerWord;
    const int64_t mine_lo = rank * L.record_bits;
    const int64_t mine_hi = mine_lo + L.record_bits;
    const int64_t a = lo > mine_lo ? lo : mine_lo;
    const int64_t b = hi < mine_hi ? hi : mine_hi;
    for (int64_t g = a; g < b; ++g) {
      v |= record_bit(h, slot_records, num_slots, g - mine_lo) << (g - lo);
    }
    return static_cast<int64_t>(v);
  }
  return 0;
}

// ---- reading the reduced buffer ------------------------------------------
EG_HD uint64_t counter_at(const int64_t* buf, const Layout& L, int64_t i) {
  const uint64_t word = static_cast<uint64_t>(buf[L.counts_offset + i / L.counters_per_word]);
  const uint64_t mask = (uint64_t{1} << L.counter_width) - 1;
  return (word >> ((i % L.counters_per_word) * L.counter_width)) & mask;
}

EG_HD uint64_t root_bit(const int64_t* buf, const Layout& L, int64_t i) {
  const uint64_t word = static_cast<uint64_t>(buf[L.root_offset + i / kBitsPerWord]);
  return (word >> (i % kBitsPerWord)) & 1u;
}

// Only valid when L.exact.
EG_HD uint64_t lane_bit(const int64_t* buf, const Layout& L, int64_t rank, int64_t i) {
  const int64_t g = rank * L.record_bits + i;
  const uint64_t word = static_cast<uint64_t>(buf[L.lanes_offset + g / kBitsPerWord]);
  return (word >> (g % kBitsPerWord)) & 1u;
}

EG_HD uint64_t root_field(const int64_t* buf, const Layout& L, int64_t off, int64_t width) {
  uint64_t v = 0;
  for (int64_t b = 0; b < width; ++b) v |= root_bit(buf, L, off + b) << b;
  return v;
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

// ---- the report ----------------------------------------------------------
// report = [GLOBAL (kGlobalWords) | SLOTS (kSlotWords x S) |
//           RANKS (kRankWords x W) and SLOT_RANKS (S x W), both only when exact]
constexpr int64_t kGlobalWords = 48;
constexpr int64_t kSlotWords = 12;
constexpr int64_t kRankWords = 8;

// GLOBAL word indices.
constexpr int64_t kGFlags = 0;
constexpr int64_t kGPresence = 1;
constexpr int64_t kGPoisonCount = 2;
constexpr int64_t kGPoisonedRank = 3;  // -1 unless exactly one rank is poisoned
constexpr int64_t kGWorld = 4;
constexpr int64_t kGSlots = 5;
constexpr int64_t kGCapacity = 6;
constexpr int64_t kGDivergedSlots = 7;
constexpr int64_t kGDecidedSlots = 8;
constexpr int64_t kGPolicy = 9;
constexpr int64_t kGFieldBase = 10;  // + 5 * field + {root, and, or, differ_lb, equal}
constexpr int64_t kGFieldStride = 5;

// GLOBAL flags.
constexpr int64_t kFlagSeqMismatch = 1 << 0;
constexpr int64_t kFlagSiteMismatch = 1 << 1;
constexpr int64_t kFlagPolicyMismatch = 1 << 2;
constexpr int64_t kFlagSlotsMismatch = 1 << 3;
constexpr int64_t kFlagWorldMismatch = 1 << 4;
constexpr int64_t kFlagPoisoned = 1 << 5;
constexpr int64_t kFlagCorrupt = 1 << 6;
constexpr int64_t kFlagExact = 1 << 7;
constexpr int64_t kFlagHeaderOk = 1 << 8;

// SLOT word indices.
constexpr int64_t kSStatus = 0;
constexpr int64_t kSVotes = 1;         // ranks that voted pass
constexpr int64_t kSRootVote = 2;
constexpr int64_t kSRootStage = 3;
constexpr int64_t kSRootTarget = 4;
constexpr int64_t kSStageAnd = 5;
constexpr int64_t kSStageOr = 6;
constexpr int64_t kSTargetAnd = 7;
constexpr int64_t kSTargetOr = 8;
constexpr int64_t kSStageDiffer = 9;   // exact when exact, else a lower bound
constexpr int64_t kSTargetDiffer = 10;
constexpr int64_t kSKeyDiffer = 11;    // (stage, target) differs from rank 0's

// SLOT status bits.
constexpr int64_t kStatusDecided = 1 << 0;
constexpr int64_t kStatusDiverged = 1 << 1;
constexpr int64_t kStatusStageDiffers = 1 << 2;
constexpr int64_t kStatusTargetDiffers = 1 << 3;
constexpr int64_t kStatusPolicyPassed = 1 << 4;
constexpr int64_t kStatusCorrupt = 1 << 5;

// SLOT_RANKS entry: vote << 12 | stage << 6 | target.

EG_HD int64_t report_words(int64_t num_slots, int64_t world) {
  int64_t n = kGlobalWords + kSlotWords * num_slots;
  if (world <= kMaxExactWorld) n += kRankWords * world + num_slots * world;
  return n;
}

EG_HD int64_t slots_offset() { return kGlobalWords; }
EG_HD int64_t ranks_offset(int64_t num_slots) { return kGlobalWords + kSlotWords * num_slots; }
EG_HD int64_t slot_ranks_offset(int64_t num_slots, int64_t world) {
  return ranks_offset(num_slots) + kRankWords * world;
}

EG_HD bool policy_passes(int64_t policy, uint64_t votes, uint64_t root_vote, uint64_t world) {
  switch (policy) {
    case kUnanimous: return votes == world;
    case kRank0: return root_vote == 1;
    case kMajority: return 2 * votes > world;
    case kAny: return votes >= 1;
    default: return false;
  }
}

// Fills GLOBAL except the slot counts and the corrupt bit that slots add.
// Returns true when the header is consistent: every rank present once, none
// poisoned, and all at the same (seq, site, policy, slots, world).
EG_HD bool decode_global(const int64_t* buf, const Layout& L, int64_t num_slots, int64_t policy, int64_t* g) {
  for (int64_t k = 0; k < kGlobalWords; ++k) g[k] = 0;
  const int64_t W = L.world;
  const int64_t presence = buf[kWordPresence];
  const int64_t rank_sum = buf[kWordRankSum];
  const int64_t poison_sum = buf[kWordPoisonRank];
  bool corrupt = presence != W || rank_sum != W * (W + 1) / 2;
  bool all_equal = true;
  int64_t flags = 0;
  for (int f = 0; f < kNumHeaderFields; ++f) {
    const FieldSummary s = summarize_field(buf, L, field_offset(f), field_width(f));
    int64_t* out = g + kGFieldBase + kGFieldStride * f;
    out[0] = static_cast<int64_t>(s.root);
    out[1] = static_cast<int64_t>(s.all_and);
    out[2] = static_cast<int64_t>(s.any_or);
    out[3] = s.differ_lb;
    out[4] = s.equal ? 1 : 0;
    if (!s.sane) corrupt = true;
    if (f == kFieldPoison || f == kFieldReason) continue;
    if (!s.equal) all_equal = false;
    if (!s.equal) {
      if (f == kFieldSeq) flags |= kFlagSeqMismatch;
      if (f == kFieldSite) flags |= kFlagSiteMismatch;
      if (f == kFieldPolicy) flags |= kFlagPolicyMismatch;
      if (f == kFieldSlots) flags |= kFlagSlotsMismatch;
      if (f == kFieldWorld) flags |= kFlagWorldMismatch;
    }
  }
  // Everyone agreeing on a slot count, policy or world size that is not ours
  // is a mismatch too (the agreed value came from somewhere else).
  if (g[kGFieldBase + kGFieldStride * kFieldSlots + 4] &&
      g[kGFieldBase + kGFieldStride * kFieldSlots] != num_slots) {
    flags |= kFlagSlotsMismatch;
    all_equal = false;
  }
  if (g[kGFieldBase + kGFieldStride * kFieldPolicy + 4] &&
      g[kGFieldBase + kGFieldStride * kFieldPolicy] != policy) {
    flags |= kFlagPolicyMismatch;
    all_equal = false;
  }
  if (g[kGFieldBase + kGFieldStride * kFieldWorld + 4] &&
      g[kGFieldBase + kGFieldStride * kFieldWorld] != (W & 2047)) {
    flags |= kFlagWorldMismatch;
    all_equal = false;
  }
  const int64_t poison_count = static_cast<int64_t>(counter_at(buf, L, field_offset(kFieldPoison)));
  const bool reason_nonzero = g[kGFieldBase + kGFieldStride * kFieldReason + 2] != 0;
  const bool poisoned = poison_count != 0 || poison_sum != 0 || reason_nonzero;
  if (poisoned) flags |= kFlagPoisoned;
  if (corrupt) flags |= kFlagCorrupt;
  if (L.exact) flags |= kFlagExact;
  const bool ok = !corrupt && !poisoned && all_equal;
  if (ok) flags |= kFlagHeaderOk;
  g[kGFlags] = flags;
  g[kGPresence] = presence;
  g[kGPoisonCount] = poison_count;
  g[kGPoisonedRank] = (poison_count == 1 && poison_sum >= 1 && poison_sum <= W) ? poison_sum - 1 : -1;
  g[kGWorld] = W;
  g[kGSlots] = num_slots;
  g[kGCapacity] = L.capacity;
  g[kGPolicy] = policy;
  return ok;
}

// One rank's header, from the lanes (exact mode only).
EG_HD void decode_rank(const int64_t* buf, const Layout& L, int64_t rank, int64_t* out) {
  for (int f = 0; f < kNumHeaderFields; ++f) {
    out[f] = static_cast<int64_t>(lane_field(buf, L, rank, field_offset(f), field_width(f)));
  }
  out[kRankWords - 1] = 0;
}

// Fills one slot's SLOT words (and its SLOT_RANKS row when exact and
// slot_ranks is given). Returns the status bits without kStatusDecided,
// which needs the global verdict (see finish_slot).
EG_HD int64_t decode_slot(
    const int64_t* buf, const Layout& L, int64_t s, int64_t policy, int64_t* out, int64_t* slot_ranks) {
  const int64_t W = L.world;
  const int64_t off = kHeaderBits + s * kSlotBits;
  const uint64_t votes = counter_at(buf, L, off + kSlotVoteBit);
  const uint64_t root_vote = root_bit(buf, L, off + kSlotVoteBit);
  const FieldSummary st = summarize_field(buf, L, off + kSlotStageBit, kIdBits);
  const FieldSummary tg = summarize_field(buf, L, off + kSlotTargetBit, kIdBits);
  bool sane = st.sane && tg.sane && votes <= static_cast<uint64_t>(W) && !(root_vote == 1 && votes == 0) &&
              !(root_vote == 0 && votes == static_cast<uint64_t>(W));
  int64_t stage_differ = st.differ_lb;
  int64_t target_differ = tg.differ_lb;
  int64_t key_differ = st.differ_lb > tg.differ_lb ? st.differ_lb : tg.differ_lb;
  if (L.exact) {
    // Exact per-rank values; also cross-check them against the counters.
    stage_differ = target_differ = key_differ = 0;
    uint64_t lane_votes = 0;
    uint64_t stage_and = kMaxId, stage_or = 0, target_and = kMaxId, target_or = 0;
    for (int64_t r = 0; r < W; ++r) {
      const uint64_t v = lane_bit(buf, L, r, off + kSlotVoteBit);
      const uint64_t sr = lane_field(buf, L, r, off + kSlotStageBit, kIdBits);
      const uint64_t tr = lane_field(buf, L, r, off + kSlotTargetBit, kIdBits);
      if (slot_ranks != nullptr) {
        slot_ranks[r] = static_cast<int64_t>((v << 12) | (sr << 6) | tr);
      }
      lane_votes += v;
      stage_and &= sr;
      stage_or |= sr;
      target_and &= tr;
      target_or |= tr;
      if (r == 0 && (v != root_vote || sr != st.root || tr != tg.root)) sane = false;
      if (sr != st.root) ++stage_differ;
      if (tr != tg.root) ++target_differ;
      if (sr != st.root || tr != tg.root) ++key_differ;
    }
    if (lane_votes != votes || stage_and != st.all_and || stage_or != st.any_or ||
        target_and != tg.all_and || target_or != tg.any_or) {
      sane = false;
    }
  }
  const bool passed = policy_passes(policy, votes, root_vote, static_cast<uint64_t>(W));
  int64_t status = 0;
  if (!st.equal) status |= kStatusStageDiffers;
  if (!tg.equal) status |= kStatusTargetDiffers;
  if (passed) status |= kStatusPolicyPassed;
  if (!sane) status |= kStatusCorrupt;
  out[kSStatus] = status;
  out[kSVotes] = static_cast<int64_t>(votes);
  out[kSRootVote] = static_cast<int64_t>(root_vote);
  out[kSRootStage] = static_cast<int64_t>(st.root);
  out[kSRootTarget] = static_cast<int64_t>(tg.root);
  out[kSStageAnd] = static_cast<int64_t>(st.all_and);
  out[kSStageOr] = static_cast<int64_t>(st.any_or);
  out[kSTargetAnd] = static_cast<int64_t>(tg.all_and);
  out[kSTargetOr] = static_cast<int64_t>(tg.any_or);
  out[kSStageDiffer] = stage_differ;
  out[kSTargetDiffer] = target_differ;
  out[kSKeyDiffer] = key_differ;
  return status;
}

// The verdict for one slot once the global state is known. A slot is decided
// only when the whole call is consistent and trustworthy, every rank holds the
// same (stage, target) and the policy passes on the votes.
EG_HD int64_t finish_slot(int64_t status, bool header_ok, bool any_corrupt) {
  const bool same_key = (status & (kStatusStageDiffers | kStatusTargetDiffers)) == 0;
  const bool trusted = header_ok && !any_corrupt;
  if (!(trusted && same_key)) status |= kStatusDiverged;
  if (trusted && same_key && (status & kStatusPolicyPassed)) status |= kStatusDecided;
  return status;
}

}  // namespace wire
}  // namespace esper_gate
