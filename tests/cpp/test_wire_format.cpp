// Unit tests of the wire format (csrc/wire/) on the host, without torch: layout sizes,
// header and slot encoding, and W simulated ranks whose summed buffers must
// decode to the expected decisions, divergences and header flags.
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "check.h"
#include "oracle.h"
#include "wire_sim.h"

using namespace eg_test;

namespace {

// World sizes that straddle every boundary of the layout: counter widths
// change at powers of two, lanes stop after 64, 65,536 is the limit.
const int64_t kWorlds[] = {1, 2, 3, 4, 5, 8, 63, 64, 65, 100, 1024, 1025, 4096, 65536};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t expected_pass(int64_t policy, int64_t votes, int64_t root_vote, int64_t world) {
  switch (policy) {
    case wire::kUnanimous: return votes == world;
    case wire::kRank0: return root_vote == 1;
    case wire::kMajority: return 2 * votes > world;
    case wire::kAny: return votes >= 1;
  }
  return -1;
}

std::vector<RankInput> agreeing_ranks(int64_t num_slots, int64_t world, int64_t policy) {
  return std::vector<RankInput>(static_cast<size_t>(world), agreeing_input(num_slots, world, policy));
}

constexpr int64_t kMismatchFlags = wire::kFlagSeqMismatch | wire::kFlagSiteMismatch |
    wire::kFlagPolicyMismatch | wire::kFlagSlotsMismatch | wire::kFlagWorldMismatch;

// Nothing may be decided once the header or any slot is not trusted.
void check_nothing_decided(const Decoded& d) {
  EXPECT(!d.flag(wire::kFlagHeaderOk));
  EXPECT_EQ(d.global(wire::kGDecidedSlots), 0);
  EXPECT_EQ(d.global(wire::kGDivergedSlots), d.num_slots);
  for (int64_t s = 0; s < d.num_slots; ++s) {
    CONTEXT("slot " << s);
    EXPECT_EQ(static_cast<int>(d.decision[s]), 0);
    EXPECT((d.status(s) & wire::kStatusDiverged) != 0);
    EXPECT((d.status(s) & wire::kStatusDecided) == 0);
  }
}

}  // namespace

// ---- layout --------------------------------------------------------------

TEST_CASE(header_fields_tile_the_header) {
  const int64_t widths[] = {32, 32, 2, 11, 17, 1, 5};
  int64_t end = 0;
  for (int f = 0; f < wire::kNumHeaderFields; ++f) {
    CONTEXT("field " << f);
    EXPECT_EQ(wire::field_offset(f), end);
    EXPECT_EQ(wire::field_width(f), widths[f]);
    end += wire::field_width(f);
  }
  EXPECT_EQ(end, wire::kHeaderBits);
  EXPECT_EQ(wire::field_width(wire::kNumHeaderFields), 0);
  // Every limit fits its field.
  EXPECT_GT(int64_t{1} << wire::field_width(wire::kFieldSlots), wire::kMaxSlots);
  EXPECT_GT(int64_t{1} << wire::field_width(wire::kFieldWorld), wire::kMaxWorld);
  EXPECT_GT(int64_t{1} << wire::field_width(wire::kFieldReason), wire::kReasonMax);
  EXPECT_EQ(int64_t{1} << wire::field_width(wire::kFieldPolicy), wire::kNumPolicies);
  EXPECT_EQ(wire::kMaxId, (int64_t{1} << wire::kIdBits) - 1);
  EXPECT_EQ(wire::kSlotStageBit, wire::kSlotVoteBit + 1);
  EXPECT_EQ(wire::kSlotTargetBit, wire::kSlotStageBit + wire::kIdBits);
  EXPECT_EQ(wire::kSlotPolicyBit, wire::kSlotTargetBit + wire::kIdBits);
  EXPECT_EQ(wire::kSlotDigestBit, wire::kSlotPolicyBit + wire::field_width(wire::kFieldPolicy));
  EXPECT_EQ(wire::kSlotBits, wire::kSlotDigestBit + wire::kDigestBits);
  EXPECT_EQ(wire::kSlotBits, 47);
  EXPECT_EQ(wire::kSlotCoreBits, wire::kSlotPolicyBit);
  EXPECT_EQ(wire::kSlotCoreBits, oracle::kSlotCoreBits);
  EXPECT_EQ(wire::slot_bits_for(false), oracle::kSlotCoreBits);
  EXPECT_EQ(wire::slot_bits_for(true), oracle::kSlotBits);
  EXPECT_EQ(wire::kNoGate, wire::kMaxId);
}

TEST_CASE(capacity_for_rounds_up_to_a_power_of_two) {
  const int64_t cases[][2] = {{0, 1},   {1, 1},     {2, 2},     {3, 4},     {4, 4},   {5, 8},
                              {63, 64}, {64, 64},   {65, 128},  {513, 1024}, {1000, 1024},
                              {1024, 1024}};
  for (const auto& c : cases) {
    CONTEXT("num_slots " << c[0]);
    EXPECT_EQ(wire::capacity_for(c[0]), c[1]);
  }
  for (int64_t n = 1; n <= wire::kMaxSlots; ++n) {
    const int64_t c = wire::capacity_for(n);
    CONTEXT("num_slots " << n);
    EXPECT((c & (c - 1)) == 0);
    EXPECT_GE(c, n);
    EXPECT_LT(c, 2 * n);
  }
}

TEST_CASE(counter_width_holds_the_world_size) {
  // {world, counter bits, counters per word}
  const int64_t cases[][3] = {{1, 1, 63}, {2, 2, 31}, {3, 2, 31},  {4, 3, 21},
                              {64, 7, 9}, {65, 7, 9}, {1024, 11, 5}, {1025, 11, 5},
                              {65535, 16, 3}, {65536, 17, 3}};
  for (const auto& c : cases) {
    CONTEXT("world " << c[0]);
    const wire::Layout L = wire::make_layout(1, c[0], false);
    EXPECT_EQ(L.counter_width, c[1]);
    EXPECT_EQ(L.counters_per_word, c[2]);
  }
  for (int64_t w = 1; w <= wire::kMaxWorld; ++w) {
    CONTEXT("world " << w);
    const wire::Layout L = wire::make_layout(1, w, w % 2 == 0);
    EXPECT_GT(int64_t{1} << L.counter_width, w);          // a counter can reach W
    EXPECT_LE(int64_t{1} << (L.counter_width - 1), w);    // and is no wider than needed
    EXPECT_LE(L.counters_per_word * L.counter_width, wire::kBitsPerWord);  // sign bit unused
    EXPECT_GT((L.counters_per_word + 1) * L.counter_width, wire::kBitsPerWord);
  }
}

TEST_CASE(layout_sections_follow_each_other) {
  // Worked by hand: {capacity, world, counts words, root words, lanes words,
  // reasons words (31 counters, as many per word as COUNTS has), total}, for
  // 47-bit slots (with the slot state) and for 13-bit slots (without).
  const int64_t with_state[][7] = {
      {1, 1, 3, 3, 3, 1, 13},          {4, 4, 14, 5, 19, 2, 43},       {1, 65, 17, 3, 0, 4, 27},
      {8, 3, 16, 8, 23, 1, 51},        {2, 100, 22, 4, 0, 4, 33},      {1024, 64, 5359, 766, 48994, 4, 55126},
      {1024, 1024, 9646, 766, 0, 7, 10422}, {1, 65536, 49, 3, 0, 11, 66}, {1024, 65536, 16076, 766, 0, 11, 16856}};
  const int64_t without[][7] = {
      {1, 1, 2, 2, 2, 1, 10},          {4, 4, 8, 3, 10, 2, 26},        {1, 65, 13, 2, 0, 4, 22},
      {8, 3, 7, 4, 10, 1, 25},         {2, 100, 14, 2, 0, 4, 23},      {1024, 64, 1491, 213, 13625, 4, 15336},
      {1024, 1024, 2683, 213, 0, 7, 2906}, {1, 65536, 38, 2, 0, 11, 54}, {1024, 65536, 4471, 213, 0, 11, 4698}};
  for (bool slot_state : {true, false}) {
    for (const auto& k : slot_state ? with_state : without) {
      CONTEXT("capacity " << k[0] << ", world " << k[1] << ", slot state " << slot_state);
      const wire::Layout L = wire::make_layout(k[0], k[1], slot_state);
      EXPECT_EQ(L.counts_words, k[2]);
      EXPECT_EQ(L.root_words, k[3]);
      EXPECT_EQ(L.lanes_words, k[4]);
      EXPECT_EQ(L.reasons_words, k[5]);
      EXPECT_EQ(L.total_words, k[6]);
    }
  }
  for (int64_t cap = 1; cap <= wire::kMaxSlots; cap *= 2) {
    for (int64_t w : kWorlds) {
      // decode picks the layout by the buffer's size: the two must differ.
      EXPECT_LT(wire::make_layout(cap, w, false).total_words, wire::make_layout(cap, w, true).total_words);
    }
  }
  for (int64_t cap = 1; cap <= wire::kMaxSlots; cap *= 2) {
    for (int64_t w : kWorlds) {
      for (bool slot_state : {false, true}) {
        CONTEXT("capacity " << cap << ", world " << w << ", slot state " << slot_state);
        const wire::Layout L = wire::make_layout(cap, w, slot_state);
        EXPECT_EQ(L.capacity, cap);
        EXPECT_EQ(L.world, w);
        EXPECT_EQ(L.slot_state, slot_state);
        EXPECT_EQ(L.slot_bits, slot_state ? 47 : 13);
        EXPECT_EQ(L.record_bits, wire::kHeaderBits + L.slot_bits * cap);
        EXPECT_EQ(L.counts_offset, wire::kFixedWords);
        EXPECT_EQ(L.counts_words, ceil_div(L.record_bits, L.counters_per_word));
        EXPECT_EQ(L.root_offset, L.counts_offset + L.counts_words);
        EXPECT_EQ(L.root_words, ceil_div(L.record_bits, 63));
        EXPECT_EQ(L.lanes_offset, L.root_offset + L.root_words);
        EXPECT_EQ(L.exact, w <= 64);
        EXPECT_EQ(L.lanes_words, w <= 64 ? ceil_div(w * L.record_bits, 63) : 0);
        EXPECT_EQ(L.reasons_offset, L.lanes_offset + L.lanes_words);
        EXPECT_EQ(L.reasons_words, ceil_div(int64_t{wire::kReasonMax}, L.counters_per_word));
        EXPECT_EQ(L.total_words, 3 + L.counts_words + L.root_words + L.lanes_words + L.reasons_words);
      }
    }
  }
}

TEST_CASE(report_layout) {
  for (int64_t s : {1, 3, 1024}) {
    for (int64_t w : kWorlds) {
      CONTEXT("slots " << s << ", world " << w);
      const int64_t exact_part = w <= 64 ? wire::kRankWords * w + s * w : 0;
      EXPECT_EQ(wire::report_words(s, w), 48 + 20 * s + exact_part + 31);
      EXPECT_EQ(wire::reason_counts_offset(s, w), 48 + 20 * s + exact_part);
      EXPECT_EQ(wire::slots_offset(), 48);
      EXPECT_EQ(wire::ranks_offset(s), 48 + 20 * s);
      EXPECT_EQ(wire::slot_ranks_offset(s, w), 48 + 20 * s + 8 * w);
    }
  }
  // The per-field block of GLOBAL fits.
  EXPECT_LE(wire::kGFieldBase + wire::kGFieldStride * wire::kNumHeaderFields, wire::kGlobalWords);
}

// ---- encoding ------------------------------------------------------------

TEST_CASE(encode_header_round_trips_through_record_bit) {
  Rng rng(1);
  for (int iter = 0; iter < 500; ++iter) {
    wire::HeaderValues h;
    uint64_t* fields[] = {&h.seq, &h.site, &h.policy, &h.slots, &h.world, &h.poison, &h.reason};
    for (int f = 0; f < wire::kNumHeaderFields; ++f) {
      *fields[f] = rng.next() & ((uint64_t{1} << wire::field_width(f)) - 1);
    }
    const wire::HeaderBits bits = wire::encode_header(h);
    CONTEXT("iteration " << iter);
    EXPECT_EQ(bits.hi >> (wire::kHeaderBits - 64), uint64_t{0});
    for (int f = 0; f < wire::kNumHeaderFields; ++f) {
      uint64_t v = 0;
      for (int64_t b = 0; b < wire::field_width(f); ++b) {
        v |= wire::record_bit(bits, nullptr, 0, wire::kSlotBits, wire::field_offset(f) + b) << b;
      }
      CONTEXT("field " << f);
      EXPECT_EQ(v, *fields[f]);
      EXPECT_EQ(wire::header_value(h, f), *fields[f]);
    }
  }
}

TEST_CASE(encode_header_masks_each_field_to_its_width) {
  wire::HeaderValues all{~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull};
  wire::HeaderBits bits = wire::encode_header(all);
  EXPECT_EQ(bits.lo, ~0ull);
  EXPECT_EQ(bits.hi, (uint64_t{1} << (wire::kHeaderBits - 64)) - 1);

  // An oversized value keeps its low bits and leaves its neighbours alone.
  wire::HeaderValues h{0x100000005ull, 0, 4 + 2, 2048 + 7, 0, 2, 32 + 3};
  bits = wire::encode_header(h);
  auto read = [&](int f) {
    uint64_t v = 0;
    for (int64_t b = 0; b < wire::field_width(f); ++b) {
      v |= wire::record_bit(bits, nullptr, 0, wire::kSlotCoreBits, wire::field_offset(f) + b) << b;
    }
    return v;
  };
  EXPECT_EQ(read(wire::kFieldSeq), uint64_t{5});
  EXPECT_EQ(read(wire::kFieldSite), uint64_t{0});
  EXPECT_EQ(read(wire::kFieldPolicy), uint64_t{2});
  EXPECT_EQ(read(wire::kFieldSlots), uint64_t{7});
  EXPECT_EQ(read(wire::kFieldWorld), uint64_t{0});
  EXPECT_EQ(read(wire::kFieldPoison), uint64_t{0});
  EXPECT_EQ(read(wire::kFieldReason), uint64_t{3});
}

// A slot's bits written out from docs/wire-format.md: vote, stage, target,
// policy, digest from bit 0 up.
uint64_t slot_bits(uint64_t v, uint64_t s, uint64_t t, uint64_t p = 0, uint64_t d = 0) {
  return v | (s << 1) | (t << 7) | (p << 13) | (d << 15);
}

TEST_CASE(encode_slot_packs_valid_values) {
  for (int64_t v = 0; v <= 1; ++v) {
    for (int64_t s = 0; s <= wire::kMaxId; ++s) {
      for (int64_t t = 0; t <= wire::kMaxId; ++t) {
        const int64_t p = (s + t) % wire::kNumPolicies;
        const int64_t d = (s * 0x01000193 + t * 0x9E3779B1 + v) & 0xFFFFFFFFll;
        int64_t reason = 99;  // overwritten
        const uint64_t r = wire::encode_slot(v, s, t, p, d, &reason);
        if (!EXPECT_EQ(reason, int64_t{wire::kReasonNone}) || !EXPECT_EQ(r, slot_bits(v, s, t, p, d))) {
          return;
        }
      }
    }
  }
  int64_t reason = 99;
  EXPECT_EQ(wire::encode_slot(1, 63, 63, 3, 0xFFFFFFFFll, &reason), (uint64_t{1} << 47) - 1);
  EXPECT_EQ(reason, int64_t{wire::kReasonNone});
}

TEST_CASE(encode_slot_masks_and_names_bad_values) {
  struct Case {
    int64_t vote, stage, target, policy, digest, reason;
    uint64_t bits;
  };
  const Case cases[] = {
      {2, 5, 6, 0, 0, wire::kReasonVote, slot_bits(0, 5, 6)},
      {-1, 5, 6, 0, 0, wire::kReasonVote, slot_bits(1, 5, 6)},
      {3, 64, 99, 0, 0, wire::kReasonVote, slot_bits(1, 0, 35)},  // the vote is named first
      {1, 64, 6, 0, 0, wire::kReasonStage, slot_bits(1, 0, 6)},
      {1, -1, 6, 0, 0, wire::kReasonStage, slot_bits(1, 63, 6)},
      {0, 65, 200, 0, 0, wire::kReasonStage, slot_bits(0, 1, 8)},  // stage before target
      {0, 5, 64, 0, 0, wire::kReasonTarget, slot_bits(0, 5, 0)},
      {0, 5, -2, 0, 0, wire::kReasonTarget, slot_bits(0, 5, 62)},
      {1, INT64_MIN, INT64_MAX, 0, 0, wire::kReasonStage, slot_bits(1, 0, 63)},
      {INT64_MAX, 0, 0, 0, 0, wire::kReasonVote, slot_bits(1, 0, 0)},
      {1, 2, 3, 4, 7, wire::kReasonPolicy, slot_bits(1, 2, 3, 0, 7)},
      {1, 2, 3, -1, 7, wire::kReasonPolicy, slot_bits(1, 2, 3, 3, 7)},
      {1, 2, 64, 9, 7, wire::kReasonTarget, slot_bits(1, 2, 0, 1, 7)},  // target before policy
      {0, 2, 3, 1, int64_t{1} << 32, wire::kReasonDigest, slot_bits(0, 2, 3, 1, 0)},
      {0, 2, 3, 1, -1, wire::kReasonDigest, slot_bits(0, 2, 3, 1, 0xFFFFFFFFull)},
      {0, 2, 3, 7, -1, wire::kReasonPolicy, slot_bits(0, 2, 3, 3, 0xFFFFFFFFull)},  // policy before digest
  };
  for (const Case& c : cases) {
    CONTEXT("vote " << c.vote << ", stage " << c.stage << ", target " << c.target << ", policy " << c.policy
                    << ", digest " << c.digest);
    int64_t reason = -1;
    EXPECT_EQ(wire::encode_slot(c.vote, c.stage, c.target, c.policy, c.digest, &reason), c.bits);
    EXPECT_EQ(reason, c.reason);
  }
  Rng rng(2);
  for (int i = 0; i < 10000; ++i) {
    int64_t reason = -1;
    const uint64_t r = wire::encode_slot(rng.word(), rng.word(), rng.word(), rng.word(), rng.word(), &reason);
    EXPECT_LT(r, uint64_t{1} << wire::kSlotBits);
    EXPECT(reason >= wire::kReasonNone && reason <= wire::kReasonDigest && reason != wire::kReasonSite);
  }
}

TEST_CASE(record_bit_reads_slots_and_pads_with_zeros) {
  // With the slot state a slot is its whole 47-bit record; without, its low
  // 13 bits (vote, stage, target) and nothing of the policy and digest above.
  const uint64_t full = (uint64_t{1} << wire::kSlotBits) - 1;
  const uint64_t records[3] = {full, 0x5a5a5a5a5a5aull & full, 0x123456789abcull & full};
  const wire::HeaderBits h{0, 0};
  for (int64_t slot_bits : {int64_t{47}, int64_t{13}}) {
    for (int64_t i = wire::kHeaderBits; i < wire::kHeaderBits + 4 * slot_bits; ++i) {
      const int64_t s = (i - wire::kHeaderBits) / slot_bits;
      const int64_t b = (i - wire::kHeaderBits) % slot_bits;
      const uint64_t want = s < 3 ? (records[s] >> b) & 1u : 0;
      CONTEXT("slot bits " << slot_bits << ", bit " << i);
      EXPECT_EQ(wire::record_bit(h, records, 3, slot_bits, i), want);
    }
  }
}

TEST_CASE(runs_of_bits_read_what_single_bits_read) {
  // record_bits and section_bits read up to 63 bits at once; bit k of a run
  // must be bit i + k, whatever word and slot boundaries the run crosses.
  Rng rng(11);
  std::vector<uint64_t> records(5);
  for (auto& r : records) r = rng.next() & ((uint64_t{1} << wire::kSlotBits) - 1);
  const wire::HeaderBits h{rng.next(), rng.next() & ((uint64_t{1} << (wire::kHeaderBits - 64)) - 1)};
  std::vector<int64_t> section(12);
  for (auto& w : section) w = rng.word();  // bit 63 set in some: never read
  for (int iter = 0; iter < 20000; ++iter) {
    const int64_t slot_bits = iter % 2 ? wire::kSlotBits : wire::kSlotCoreBits;
    auto bit = [&](int64_t i) -> uint64_t {  // written out from the layout, not from record_bits
      if (i < 64) return (h.lo >> i) & 1u;
      if (i < wire::kHeaderBits) return (h.hi >> (i - 64)) & 1u;
      const int64_t s = (i - wire::kHeaderBits) / slot_bits;
      return s < 4 ? (records[s] >> ((i - wire::kHeaderBits) % slot_bits)) & 1u : 0;  // 4 of 5 sent
    };
    const int64_t record_len = wire::kHeaderBits + 8 * slot_bits;
    const int64_t n = rng.below(64);
    const int64_t i = rng.below(record_len - n + 1);
    uint64_t want = 0;
    for (int64_t k = 0; k < n; ++k) want |= bit(i + k) << k;
    CONTEXT("slot bits " << slot_bits << ", record bits " << i << " + " << n);
    if (!EXPECT_EQ(wire::record_bits(h, records.data(), 4, slot_bits, i, n), want)) break;
    const int64_t g = rng.below(11 * 63 - n + 1);
    uint64_t section_want = 0;
    for (int64_t k = 0; k < n; ++k) {
      section_want |= ((static_cast<uint64_t>(section[1 + (g + k) / 63]) >> ((g + k) % 63)) & 1u) << k;
    }
    CONTEXT("section bits " << g << " + " << n);
    if (!EXPECT_EQ(wire::section_bits(section.data(), 1, g, n), section_want)) break;
  }
}

TEST_CASE(pack_word_puts_each_section_in_place) {
  const int64_t n = 3;
  for (int64_t world : {1, 3, 64, 65}) {
    const wire::Layout L = wire::make_layout(wire::capacity_for(n), world, false);
    RankInput in = agreeing_input(n, world, wire::kMajority);
    in.votes = {1, 0, 1};
    std::vector<uint64_t> records;
    const wire::HeaderValues hv = effective_header(in, &records);
    const wire::HeaderBits h = wire::encode_header(hv);
    for (int64_t rank : {int64_t{0}, world - 1}) {
      CONTEXT("world " << world << ", rank " << rank);
      const std::vector<int64_t> buf = pack_rank(in, rank, world);
      EXPECT_EQ(buf[wire::kWordPresence], 1);
      EXPECT_EQ(buf[wire::kWordRankSum], rank + 1);
      EXPECT_EQ(buf[wire::kWordPoisonRank], 0);
      EXPECT_EQ(wire::pack_word(L, h, records.data(), n, rank, true, wire::kWordPoisonRank), rank + 1);
      EXPECT_EQ(wire::pack_word(L, h, records.data(), n, rank, false, L.total_words), 0);
      for (int64_t w = 0; w < L.total_words; ++w) EXPECT_GE(buf[w], 0);
      for (int64_t i = 0; i < L.record_bits; ++i) {
        const uint64_t bit = wire::record_bit(h, records.data(), n, L.slot_bits, i);
        EXPECT_EQ(wire::counter_at(buf.data(), L, i), bit);
        EXPECT_EQ(wire::root_bit(buf.data(), L, i), rank == 0 ? bit : 0);
      }
      // An unpoisoned rank counts under no reason; poisoned, it counts once
      // under the reason its header carries.
      for (int64_t code = 1; code <= wire::kReasonMax; ++code) {
        EXPECT_EQ(wire::reason_counter_at(buf.data(), L, code), 0u);
      }
      RankInput bad = in;
      bad.header = header_values(41, 0xC0FFEE, wire::kMajority, n, world, wire::kReasonCallerMin + 5);
      const std::vector<int64_t> poisoned = pack_rank(bad, rank, world);
      for (int64_t code = 1; code <= wire::kReasonMax; ++code) {
        CONTEXT("reason " << code);
        EXPECT_EQ(wire::reason_counter_at(poisoned.data(), L, code), code == wire::kReasonCallerMin + 5 ? 1u : 0u);
      }
      if (L.exact) {
        // Only this rank's lane is non-zero, and it holds the record.
        for (int64_t r = 0; r < world; ++r) {
          for (int64_t i = 0; i < L.record_bits; ++i) {
            const uint64_t want = r == rank ? wire::record_bit(h, records.data(), n, L.slot_bits, i) : 0;
            if (!EXPECT_EQ(wire::lane_bit(buf.data(), L, r, i), want)) break;
          }
        }
      }
    }
  }
}

TEST_CASE(all_ones_records_sum_without_overflow) {
  // Every rank sets every record bit, so every counter reaches W: the widest
  // sums the buffer can carry, including padding slots left at zero.
  for (int64_t world : {1, 2, 3, 63, 64, 65, 127, 128, 1023, 1024}) {
    for (int64_t n : {2, 3}) {
      CONTEXT("world " << world << ", slots " << n);
      RankInput in;
      in.votes.assign(n, 1);
      in.stages.assign(n, 63);
      in.targets.assign(n, 63);
      in.policies.assign(n, 3);
      in.digests.assign(n, 0xFFFFFFFFll);
      in.header = wire::HeaderValues{~0ull, ~0ull, 3, ~0ull, ~0ull, 1, wire::kReasonMax};
      const std::vector<RankInput> inputs(static_cast<size_t>(world), in);
      const std::vector<int64_t> sum = reduce_ranks(inputs, world);
      const wire::Layout L = wire::make_layout(wire::capacity_for(n), world, true);
      EXPECT_EQ(static_cast<int64_t>(sum.size()), L.total_words);
      for (int64_t w = 0; w < L.total_words; ++w) EXPECT_GE(sum[w], 0);
      const int64_t used_bits = wire::kHeaderBits + wire::kSlotBits * n;
      for (int64_t i = 0; i < L.record_bits; ++i) {
        const uint64_t want = i < used_bits ? static_cast<uint64_t>(world) : 0;
        if (!EXPECT_EQ(wire::counter_at(sum.data(), L, i), want)) break;
      }
      for (int64_t code = 1; code <= wire::kReasonMax; ++code) {
        EXPECT_EQ(wire::reason_counter_at(sum.data(), L, code), code == wire::kReasonMax ? uint64_t(world) : 0u);
      }
      const Decoded d = decode_all(sum, n, world, wire::kAny);
      EXPECT(!d.flag(wire::kFlagCorrupt));
      EXPECT(d.flag(wire::kFlagPoisoned));
      EXPECT_EQ(d.global(wire::kGPoisonCount), world);
      EXPECT_EQ(d.reason_count(wire::kReasonMax), world);
      for (int f = 0; f < wire::kNumHeaderFields; ++f) {
        CONTEXT("field " << f);
        const int64_t mask = (int64_t{1} << wire::field_width(f)) - 1;
        EXPECT_EQ(d.field(f, 0), mask);
        EXPECT_EQ(d.field(f, 1), mask);
        EXPECT_EQ(d.field(f, 4), 1);
      }
      for (int64_t s = 0; s < n; ++s) {
        EXPECT_EQ(d.slot(s)[wire::kSVotes], world);
        EXPECT_EQ(d.slot(s)[wire::kSStageAnd], 63);
        EXPECT_EQ(d.slot(s)[wire::kSTargetAnd], 63);
        EXPECT((d.status(s) & wire::kStatusCorrupt) == 0);
      }
    }
  }
}

// ---- decisions -----------------------------------------------------------

TEST_CASE(no_gate_policy_and_digest_are_per_slot_state) {
  // Worked by hand, at every world size up to the limit. Slots:
  //   0: every rank passes G0 (target 0), unanimous: decided;
  //   1: no gate on any rank, every vote yes: not decided, not diverged;
  //   2: the last rank has no gate where the others are at G0: diverged;
  //   3: own policy rank0, only rank 0 votes yes: decided (the header says unanimous);
  //   4: the last rank holds another digest: diverged, though every vote is yes;
  //   5: the last rank holds policy any where the others hold majority: diverged.
  for (int64_t world : {int64_t{2}, int64_t{3}, int64_t{64}, int64_t{65}, int64_t{1025}, wire::kMaxWorld}) {
    CONTEXT("world " << world);
    const int64_t last = world - 1;
    RankInput base = agreeing_input(6, world, wire::kUnanimous);
    base.targets = {0, wire::kNoGate, 0, 2, 3, 3};
    base.policies = {wire::kUnanimous, wire::kUnanimous, wire::kUnanimous, wire::kRank0, wire::kAny,
                     wire::kMajority};
    base.digests = {0, 0, 0, 0, 0xDEADBEEFll, 0};
    std::vector<RankInput> inputs(static_cast<size_t>(world), base);
    for (int64_t r = 1; r < world; ++r) inputs[r].votes[3] = 0;
    inputs[last].targets[2] = wire::kNoGate;
    inputs[last].digests[4] = 0xDEADBEEEll;
    inputs[last].policies[5] = wire::kAny;
    const Decoded d = simulate(inputs, wire::kUnanimous);
    EXPECT(d.flag(wire::kFlagHeaderOk));
    const std::vector<uint8_t> want_decision = {1, 0, 0, 1, 0, 0};
    EXPECT(d.decision == want_decision);
    EXPECT_EQ(d.status(0), wire::kStatusDecided | wire::kStatusPolicyPassed);
    EXPECT_EQ(d.status(1), wire::kStatusNoGate | wire::kStatusPolicyPassed);
    EXPECT_EQ(d.status(2), wire::kStatusDiverged | wire::kStatusTargetDiffers | wire::kStatusPolicyPassed);
    EXPECT_EQ(d.status(3), wire::kStatusDecided | wire::kStatusPolicyPassed);
    EXPECT_EQ(d.status(4), wire::kStatusDiverged | wire::kStatusDigestDiffers | wire::kStatusPolicyPassed);
    EXPECT_EQ(d.status(5), wire::kStatusDiverged | wire::kStatusPolicyDiffers | wire::kStatusPolicyPassed);
    EXPECT_EQ(d.global(wire::kGDecidedSlots), 2);
    EXPECT_EQ(d.global(wire::kGDivergedSlots), 3);
    EXPECT_EQ(d.slot(3)[wire::kSRootPolicy], wire::kRank0);
    EXPECT_EQ(d.slot(3)[wire::kSVotes], 1);
    EXPECT_EQ(d.slot(4)[wire::kSRootDigest], 0xDEADBEEFll);
    EXPECT_EQ(d.slot(4)[wire::kSDigestAnd], 0xDEADBEEEll);
    EXPECT_EQ(d.slot(4)[wire::kSDigestOr], 0xDEADBEEFll);
    EXPECT_EQ(d.slot(4)[wire::kSDigestDiffer], 1);  // one bit differs: exact even from the counters
    EXPECT_EQ(d.slot(4)[wire::kSKeyDiffer], 1);
    EXPECT_EQ(d.slot(5)[wire::kSPolicyAnd], wire::kMajority & wire::kAny);
    EXPECT_EQ(d.slot(5)[wire::kSPolicyOr], wire::kMajority | wire::kAny);
    EXPECT_EQ(d.slot(5)[wire::kSPolicyDiffer], 1);
    EXPECT_EQ(d.slot(2)[wire::kSTargetOr], wire::kNoGate);
    if (world <= wire::kMaxExactWorld) {
      // The exact report names the rank and what it holds.
      EXPECT_EQ(d.slot_rank(2, last), wire::slot_entry(1, 2, wire::kNoGate, wire::kUnanimous, 0));
      EXPECT_EQ(d.slot_rank(2, 0), wire::slot_entry(1, 2, 0, wire::kUnanimous, 0));
      EXPECT_EQ(d.slot_rank(4, last), wire::slot_entry(1, 4, 3, wire::kAny, 0xDEADBEEEll));
      EXPECT_EQ(d.slot_rank(5, last), wire::slot_entry(1, 5, 3, wire::kAny, 0));
      EXPECT_EQ(d.slot_rank(3, 1), wire::slot_entry(0, 3, 2, wire::kRank0, 0));
    }
  }
}


TEST_CASE(policies_decide_from_exact_vote_counts) {
  Rng rng(3);
  for (int64_t world : kWorlds) {
    // Vote counts at every policy edge, then a few at random.
    std::vector<int64_t> counts = {0, 1, world / 2, world / 2 + 1, (world + 1) / 2, world - 1, world};
    for (int i = 0; i < 6; ++i) counts.push_back(rng.below(world + 1));
    counts.erase(std::remove_if(counts.begin(), counts.end(),
                                [&](int64_t k) { return k < 0 || k > world; }),
                 counts.end());
    // Each count twice: once with rank 0 among the voters, once without.
    const int64_t n = 2 * static_cast<int64_t>(counts.size());
    for (int64_t policy = 0; policy < wire::kNumPolicies; ++policy) {
      CONTEXT("world " << world << ", policy " << policy);
      std::vector<RankInput> inputs = agreeing_ranks(n, world, policy);
      std::vector<int64_t> want_votes(n), want_root(n);
      for (int64_t s = 0; s < n; ++s) {
        const int64_t k = counts[s / 2];
        // Voters: a random k-subset with rank 0 in it or not, when possible.
        std::vector<int64_t> order(world);
        for (int64_t r = 0; r < world; ++r) order[r] = r;
        for (int64_t r = world - 1; r > 0; --r) std::swap(order[r], order[rng.below(r + 1)]);
        const bool want_rank0 = s % 2 == 0;
        auto it = std::find(order.begin(), order.end(), 0);
        if (want_rank0) std::iter_swap(order.begin(), it); else std::iter_swap(order.end() - 1, it);
        for (int64_t r = 0; r < world; ++r) inputs[r].votes[s] = 0;
        for (int64_t j = 0; j < k; ++j) inputs[order[j]].votes[s] = 1;
        want_votes[s] = k;
        want_root[s] = inputs[0].votes[s];
      }
      const Decoded d = simulate(inputs, policy);
      EXPECT(d.header_ok);
      EXPECT_EQ(d.flags(), wire::kFlagHeaderOk | (world <= 64 ? wire::kFlagExact : 0));
      EXPECT_EQ(d.global(wire::kGPresence), world);
      EXPECT_EQ(d.global(wire::kGWorld), world);
      EXPECT_EQ(d.global(wire::kGSlots), n);
      EXPECT_EQ(d.global(wire::kGCapacity), wire::capacity_for(n));
      EXPECT_EQ(d.global(wire::kGPolicy), policy);
      EXPECT_EQ(d.global(wire::kGPoisonedRank), -1);
      EXPECT_EQ(d.global(wire::kGDivergedSlots), 0);
      int64_t decided = 0;
      for (int64_t s = 0; s < n; ++s) {
        CONTEXT("slot " << s << " with " << want_votes[s] << " votes, rank 0 votes " << want_root[s]);
        const int64_t pass = expected_pass(policy, want_votes[s], want_root[s], world);
        decided += pass;
        EXPECT_EQ(d.slot(s)[wire::kSVotes], want_votes[s]);
        EXPECT_EQ(d.slot(s)[wire::kSRootVote], want_root[s]);
        EXPECT_EQ(static_cast<int64_t>(d.decision[s]), pass);
        EXPECT_EQ(d.status(s), pass ? wire::kStatusPolicyPassed | wire::kStatusDecided : 0);
        EXPECT_EQ(d.slot(s)[wire::kSRootStage], s % 64);
        EXPECT_EQ(d.slot(s)[wire::kSRootTarget], (7 * s + 3) % 64);
      }
      EXPECT_EQ(d.global(wire::kGDecidedSlots), decided);
    }
  }
}

TEST_CASE(majority_tie_fails_and_one_more_vote_passes) {
  for (int64_t world : {2, 4, 64, 100, 1024}) {
    CONTEXT("world " << world);
    std::vector<RankInput> inputs = agreeing_ranks(2, world, wire::kMajority);
    for (int64_t r = 0; r < world; ++r) {
      inputs[r].votes[0] = r < world / 2 ? 1 : 0;       // a tie
      inputs[r].votes[1] = r <= world / 2 ? 1 : 0;      // a majority of one
    }
    const Decoded d = simulate(inputs, wire::kMajority);
    EXPECT_EQ(d.slot(0)[wire::kSVotes], world / 2);
    EXPECT_EQ(static_cast<int>(d.decision[0]), 0);
    EXPECT_EQ(static_cast<int>(d.decision[1]), 1);
  }
}

TEST_CASE(rank0_policy_follows_rank0_alone) {
  for (int64_t world : {2, 3, 64, 65, 100}) {
    CONTEXT("world " << world);
    std::vector<RankInput> inputs = agreeing_ranks(2, world, wire::kRank0);
    for (int64_t r = 0; r < world; ++r) {
      inputs[r].votes[0] = r == 0 ? 0 : 1;  // everyone but rank 0
      inputs[r].votes[1] = r == 0 ? 1 : 0;  // rank 0 alone
    }
    const Decoded d = simulate(inputs, wire::kRank0);
    EXPECT_EQ(static_cast<int>(d.decision[0]), 0);
    EXPECT_EQ(static_cast<int>(d.decision[1]), 1);
    EXPECT_EQ(d.slot(0)[wire::kSVotes], world - 1);
    EXPECT_EQ(d.slot(1)[wire::kSVotes], 1);
  }
}

// ---- divergence ----------------------------------------------------------

namespace {

// Ranks in `odd` give slot `slot` a different stage (which == 0) or target
// (which == 1): base ^ alt(r).
void check_divergence(int64_t world, int which, const std::vector<int64_t>& odd, bool uniform) {
  const int64_t n = 5, slot = 2;
  std::vector<RankInput> inputs = agreeing_ranks(n, world, wire::kUnanimous);
  std::vector<int64_t> values(world);
  for (int64_t r = 0; r < world; ++r) {
    std::vector<int64_t>& field = which == 0 ? inputs[r].stages : inputs[r].targets;
    if (std::find(odd.begin(), odd.end(), r) != odd.end()) {
      field[slot] ^= uniform ? 0x2a : int64_t{1} << (r % wire::kIdBits);
    }
    values[r] = field[slot];
  }
  int64_t differ = 0, and_all = wire::kMaxId, or_all = 0;
  for (int64_t r = 0; r < world; ++r) {
    differ += values[r] != values[0];
    and_all &= values[r];
    or_all |= values[r];
  }
  const Decoded d = simulate(inputs, wire::kUnanimous);
  EXPECT(d.header_ok);
  EXPECT(!d.flag(wire::kFlagCorrupt));
  EXPECT_EQ(d.global(wire::kGDivergedSlots), 1);
  EXPECT_EQ(d.global(wire::kGDecidedSlots), n - 1);
  for (int64_t s = 0; s < n; ++s) {
    CONTEXT("slot " << s);
    if (s != slot) {
      EXPECT_EQ(d.status(s), wire::kStatusPolicyPassed | wire::kStatusDecided);
      EXPECT_EQ(static_cast<int>(d.decision[s]), 1);
      EXPECT_EQ(d.slot(s)[wire::kSStageDiffer], 0);
      EXPECT_EQ(d.slot(s)[wire::kSTargetDiffer], 0);
      EXPECT_EQ(d.slot(s)[wire::kSKeyDiffer], 0);
    }
  }
  const int64_t* o = d.slot(slot);
  const int64_t differs_bit = which == 0 ? wire::kStatusStageDiffers : wire::kStatusTargetDiffers;
  EXPECT_EQ(o[wire::kSStatus], wire::kStatusPolicyPassed | wire::kStatusDiverged | differs_bit);
  EXPECT_EQ(static_cast<int>(d.decision[slot]), 0);
  EXPECT_EQ(o[which == 0 ? wire::kSRootStage : wire::kSRootTarget], values[0]);
  EXPECT_EQ(o[which == 0 ? wire::kSStageAnd : wire::kSTargetAnd], and_all);
  EXPECT_EQ(o[which == 0 ? wire::kSStageOr : wire::kSTargetOr], or_all);
  const int64_t got = o[which == 0 ? wire::kSStageDiffer : wire::kSTargetDiffer];
  EXPECT_EQ(o[which == 0 ? wire::kSTargetDiffer : wire::kSStageDiffer], 0);
  EXPECT_EQ(o[wire::kSKeyDiffer], got);
  if (world <= wire::kMaxExactWorld) {
    EXPECT_EQ(got, differ);
    for (int64_t r = 0; r < world; ++r) {
      CONTEXT("rank " << r);
      const int64_t stage = inputs[r].stages[slot], target = inputs[r].targets[slot];
      EXPECT_EQ(d.slot_rank(slot, r), (int64_t{1} << oracle::kEntryVoteShift) | (stage << oracle::kEntryStageShift) | target);
    }
  } else if (uniform) {
    // One alternative value: the bits it changes are counted exactly.
    EXPECT_EQ(got, differ);
  } else {
    EXPECT_GE(got, 1);
    EXPECT_LE(got, differ);
  }
}

}  // namespace

TEST_CASE(divergence_is_flagged_on_exactly_that_slot) {
  for (int64_t world : {2, 3, 4, 64, 65, 100, 1024}) {
    const std::vector<std::vector<int64_t>> odd_sets = {
        {world - 1}, {0}, {1}, [&] {
          std::vector<int64_t> v;
          for (int64_t r = 0; r < world; r += 2) v.push_back(r);
          return v;
        }()};
    for (const auto& odd : odd_sets) {
      for (int which = 0; which < 2; ++which) {
        for (bool uniform : {true, false}) {
          CONTEXT("world " << world << ", " << (which == 0 ? "stage" : "target") << ", "
                           << odd.size() << " odd ranks from " << odd[0]
                           << (uniform ? ", one alternative" : ", spread alternatives"));
          check_divergence(world, which, odd, uniform);
        }
      }
    }
  }
}

TEST_CASE(differ_count_is_a_lower_bound_past_64_ranks) {
  // 60 ranks each flip one of the six stage bits: ten per bit. Without lanes
  // the counters can only say "at least 10"; with lanes (W = 64) it is 60.
  for (int64_t world : {64, 100}) {
    CONTEXT("world " << world);
    std::vector<RankInput> inputs = agreeing_ranks(1, world, wire::kAny);
    for (int64_t r = 1; r <= 60; ++r) inputs[r].stages[0] ^= int64_t{1} << (r % 6);
    const Decoded d = simulate(inputs, wire::kAny);
    EXPECT_EQ(d.slot(0)[wire::kSStageDiffer], world <= 64 ? 60 : 10);
    EXPECT_EQ(d.slot(0)[wire::kSKeyDiffer], world <= 64 ? 60 : 10);
    EXPECT((d.status(0) & wire::kStatusDiverged) != 0);
  }
}

TEST_CASE(stage_and_target_differences_add_up_in_key_differ) {
  for (int64_t world : {4, 64}) {
    CONTEXT("world " << world);
    std::vector<RankInput> inputs = agreeing_ranks(1, world, wire::kAny);
    inputs[1].stages[0] ^= 1;
    inputs[2].targets[0] ^= 1;
    inputs[3].stages[0] ^= 2;
    inputs[3].targets[0] ^= 2;
    const Decoded d = simulate(inputs, wire::kAny);
    EXPECT_EQ(d.slot(0)[wire::kSStageDiffer], 2);
    EXPECT_EQ(d.slot(0)[wire::kSTargetDiffer], 2);
    EXPECT_EQ(d.slot(0)[wire::kSKeyDiffer], 3);
    EXPECT_EQ(d.status(0), wire::kStatusPolicyPassed | wire::kStatusDiverged |
                              wire::kStatusStageDiffers | wire::kStatusTargetDiffers);
  }
}

// ---- header mismatches ---------------------------------------------------

TEST_CASE(header_mismatches_raise_exactly_their_flag) {
  const int64_t n = 4;
  for (int64_t world : {2, 3, 64, 65, 100}) {
    for (int64_t odd : {int64_t{0}, world - 1}) {
      struct Variant {
        const char* name;
        int64_t flag;
        int field;
      };
      const Variant variants[] = {
          {"seq", wire::kFlagSeqMismatch, wire::kFieldSeq},
          {"site", wire::kFlagSiteMismatch, wire::kFieldSite},
          {"policy", wire::kFlagPolicyMismatch, wire::kFieldPolicy},
          {"slots", wire::kFlagSlotsMismatch, wire::kFieldSlots},
          {"world", wire::kFlagWorldMismatch, wire::kFieldWorld},
      };
      for (const Variant& v : variants) {
        CONTEXT("world " << world << ", rank " << odd << " differs in " << v.name);
        std::vector<RankInput> inputs = agreeing_ranks(n, world, wire::kAny);
        RankInput& in = inputs[odd];
        switch (v.field) {
          case wire::kFieldSeq: in.header.seq += 1; break;
          case wire::kFieldSite: in.header.site ^= 0x80000000u; break;
          case wire::kFieldPolicy: in.header.policy = wire::kMajority; break;
          case wire::kFieldSlots:  // 3 slots: the same capacity, so equal buffers
            in = agreeing_input(n - 1, world, wire::kAny);
            break;
          case wire::kFieldWorld: in.header.world = world + 1; break;
        }
        const std::vector<int64_t> sum = reduce_ranks(inputs, world);
        // Every rank decodes with its own slot count and must see the same.
        for (int64_t viewer : {int64_t{0}, world - 1}) {
          CONTEXT("decoded by rank " << viewer);
          const Decoded d = decode_all(sum, static_cast<int64_t>(inputs[viewer].votes.size()),
                                       world, wire::kAny);
          EXPECT_EQ(d.flags() & kMismatchFlags, v.flag);
          EXPECT(!d.flag(wire::kFlagCorrupt));
          EXPECT(!d.flag(wire::kFlagPoisoned));
          EXPECT_EQ(d.field(v.field, 4), 0);
          EXPECT_EQ(d.field(v.field, 3), world == 2 || odd != 0 ? 1 : world - 1);
          check_nothing_decided(d);
        }
      }
    }
  }
}

TEST_CASE(agreed_header_values_that_are_not_ours_mismatch) {
  for (int64_t world : {3, 100}) {
    CONTEXT("world " << world);
    // Everyone packed 3 slots; we decode 4 (same capacity).
    std::vector<RankInput> inputs = agreeing_ranks(3, world, wire::kAny);
    Decoded d = decode_all(reduce_ranks(inputs, world), 4, world, wire::kAny);
    EXPECT_EQ(d.flags() & kMismatchFlags, wire::kFlagSlotsMismatch);
    check_nothing_decided(d);
    // Everyone claims world + 1 in the header.
    inputs = agreeing_ranks(3, world, wire::kAny);
    for (auto& in : inputs) in.header.world = world + 1;
    d = simulate(inputs, wire::kAny);
    EXPECT_EQ(d.flags() & kMismatchFlags, wire::kFlagWorldMismatch);
    check_nothing_decided(d);
  }
}

// ---- poison and missing ranks ---------------------------------------------

TEST_CASE(a_poisoned_rank_is_named) {
  for (int64_t world : {1, 2, 3, 64, 65, 100}) {
    for (int64_t bad : {int64_t{0}, world / 2, world - 1}) {
      struct Variant {
        const char* name;
        int64_t reason;
      };
      const Variant variants[] = {{"vote", wire::kReasonVote},
                                  {"stage", wire::kReasonStage},
                                  {"target", wire::kReasonTarget},
                                  {"caller", wire::kReasonCallerMin + 1},
                                  {"caller over slot", wire::kReasonCallerMin}};
      for (const Variant& v : variants) {
        CONTEXT("world " << world << ", rank " << bad << " poisoned by " << v.name);
        std::vector<RankInput> inputs = agreeing_ranks(3, world, wire::kAny);
        RankInput& in = inputs[bad];
        if (v.reason == wire::kReasonVote) in.votes[1] = 2;
        if (v.reason == wire::kReasonStage) in.stages[2] = 64;
        if (v.reason == wire::kReasonTarget) in.targets[0] = -1;
        if (v.reason >= wire::kReasonCallerMin) {
          in.header = header_values(41, 0xC0FFEE, wire::kAny, 3, world, v.reason);
          if (v.reason == wire::kReasonCallerMin) in.votes[0] = 7;  // the caller's code wins
        }
        const Decoded d = simulate(inputs, wire::kAny);
        EXPECT(d.flag(wire::kFlagPoisoned));
        EXPECT(!d.flag(wire::kFlagCorrupt));
        EXPECT_EQ(d.flags() & kMismatchFlags, 0);
        EXPECT_EQ(d.global(wire::kGPoisonCount), 1);
        EXPECT_EQ(d.global(wire::kGPoisonedRank), bad);
        EXPECT_EQ(d.field(wire::kFieldReason, 2), v.reason);  // OR over ranks
        EXPECT_EQ(d.field(wire::kFieldPoison, 2), 1);
        check_nothing_decided(d);
        if (world <= wire::kMaxExactWorld) {
          for (int64_t r = 0; r < world; ++r) {
            CONTEXT("rank " << r);
            EXPECT_EQ(d.rank(r)[wire::kFieldPoison], r == bad ? 1 : 0);
            EXPECT_EQ(d.rank(r)[wire::kFieldReason], r == bad ? v.reason : 0);
            EXPECT_EQ(d.rank(r)[wire::kFieldWorld], world);
            EXPECT_EQ(d.rank(r)[wire::kFieldSlots], 3);
          }
        }
      }
    }
  }
}

TEST_CASE(two_poisoned_ranks_are_counted_not_named) {
  for (int64_t world : {2, 3, 64, 65, 100}) {
    // Ranks 0 and 1 add 1 + 2 to the poisoned-rank sum, which alone would
    // name rank 2.
    for (int64_t second : {int64_t{1}, world - 1}) {
      CONTEXT("world " << world << ", ranks 0 and " << second);
      std::vector<RankInput> inputs = agreeing_ranks(2, world, wire::kAny);
      inputs[0].votes[0] = 5;
      inputs[second].stages[1] = 100;
      const Decoded d = simulate(inputs, wire::kAny);
      EXPECT(d.flag(wire::kFlagPoisoned));
      EXPECT_EQ(d.global(wire::kGPoisonCount), 2);
      EXPECT_EQ(d.global(wire::kGPoisonedRank), -1);
      EXPECT_EQ(d.field(wire::kFieldReason, 2), wire::kReasonVote | wire::kReasonStage);
      check_nothing_decided(d);
    }
  }
}

TEST_CASE(every_reason_reaches_every_rank_at_any_world) {
  // Three ranks poisoned for three reasons, two of them for the same one past
  // the lanes too: REASON_COUNTS counts each reason on every view.
  for (int64_t world : {3, 64, 65, 1024, 65536}) {
    const int64_t a = 0, b = world / 2, c = world - 1;
    std::vector<RankInput> inputs = agreeing_ranks(2, world, wire::kAny);
    inputs[a].stages[1] = 64;
    inputs[b].header = header_values(41, 0xC0FFEE, wire::kAny, 2, world, wire::kReasonCallerMin + 4);
    inputs[c].votes[0] = 3;
    const std::vector<int64_t> sum = reduce_ranks(inputs, world);
    for (int64_t view : {a, b, c}) {
      CONTEXT("world " << world << ", view of rank " << view);
      const Decoded d = decode_all(sum, 2, world, wire::kAny);
      EXPECT(!d.flag(wire::kFlagCorrupt));
      EXPECT_EQ(d.global(wire::kGPoisonCount), 3);
      for (int64_t code = 1; code <= wire::kReasonMax; ++code) {
        CONTEXT("reason " << code);
        const int64_t want = code == wire::kReasonStage || code == wire::kReasonVote ||
                             code == wire::kReasonCallerMin + 4;
        EXPECT_EQ(d.reason_count(code), want);
      }
    }
  }
}

TEST_CASE(reason_counts_that_honest_ranks_cannot_send_are_corrupt) {
  for (int64_t world : {5, 100}) {
    CONTEXT("world " << world);
    std::vector<RankInput> inputs = agreeing_ranks(2, world, wire::kAny);
    inputs[1].stages[0] = 99;
    const std::vector<int64_t> good = reduce_ranks(inputs, world);
    const wire::Layout L = wire::make_layout(2, world, false);
    EXPECT(!decode_all(good, 2, world, wire::kAny).flag(wire::kFlagCorrupt));
    auto add = [&](std::vector<int64_t>* buf, int64_t code, int64_t n) {
      (*buf)[wire::reason_counter_word(L, code)] += n * (int64_t{1} << wire::reason_counter_shift(L, code));
    };
    // A second rank counted under a reason, but only one poison bit: the
    // counts do not add up to the poisoned ranks.
    std::vector<int64_t> buf = good;
    add(&buf, wire::kReasonVote, 1);
    Decoded d = decode_all(buf, 2, world, wire::kAny);
    EXPECT(d.flag(wire::kFlagCorrupt) && !d.flag(wire::kFlagHeaderOk));
    check_nothing_decided(d);
    // The poisoned rank's count moved out of its counter: none left.
    buf = good;
    add(&buf, wire::kReasonStage, -1);
    d = decode_all(buf, 2, world, wire::kAny);
    EXPECT(d.flag(wire::kFlagCorrupt));
    // A counter above the world size.
    buf = good;
    add(&buf, wire::kReasonMax, world + 1);
    d = decode_all(buf, 2, world, wire::kAny);
    EXPECT(d.flag(wire::kFlagCorrupt));
    EXPECT_EQ(d.reason_count(wire::kReasonMax), world + 1);
  }
}

TEST_CASE(a_reason_without_the_poison_bit_still_poisons) {
  std::vector<RankInput> inputs = agreeing_ranks(2, 3, wire::kAny);
  inputs[1].header.reason = wire::kReasonCallerMin + 3;
  const Decoded d = simulate(inputs, wire::kAny);
  EXPECT(d.flag(wire::kFlagPoisoned));
  EXPECT_EQ(d.global(wire::kGPoisonCount), 0);
  EXPECT_EQ(d.global(wire::kGPoisonedRank), -1);
  EXPECT_EQ(d.reason_count(wire::kReasonCallerMin + 3), 0);  // counted only with the poison bit
  EXPECT(!d.flag(wire::kFlagCorrupt));
  check_nothing_decided(d);
}

TEST_CASE(missing_duplicated_and_extra_ranks_are_corrupt) {
  for (int64_t world : {4, 64, 65, 100}) {
    CONTEXT("world " << world);
    const std::vector<RankInput> inputs = agreeing_ranks(3, world, wire::kAny);
    std::vector<int64_t> all(world);
    for (int64_t r = 0; r < world; ++r) all[r] = r;

    std::vector<int64_t> missing = all;
    missing.erase(missing.begin() + 2);
    std::vector<int64_t> duplicated = all;
    duplicated[2] = 1;
    std::vector<int64_t> extra = all;
    extra.push_back(world - 1);
    // Presence and rank sum both right: rank 0 twice and rank 3 twice stand
    // in for ranks 1 and 2 (1+1+4+4 == 1+2+3+4); ROOT then holds rank 0's
    // record twice, which no valid sum produces.
    std::vector<int64_t> disguised = all;
    disguised[1] = 0;
    disguised[2] = 3;
    const std::pair<const char*, const std::vector<int64_t>*> cases[] = {
        {"missing", &missing}, {"duplicated", &duplicated}, {"extra", &extra},
        {"disguised", &disguised}};
    for (const auto& c : cases) {
      CONTEXT(c.first);
      const Decoded d = decode_all(reduce_ranks(inputs, world, *c.second), 3, world, wire::kAny);
      EXPECT(d.flag(wire::kFlagCorrupt));
      check_nothing_decided(d);
    }
  }
}

TEST_CASE(inconsistent_sections_are_corrupt) {
  for (int64_t world : {3, 5, 64, 100}) {
    CONTEXT("world " << world);
    const std::vector<RankInput> inputs = agreeing_ranks(2, world, wire::kAny);
    const std::vector<int64_t> good = reduce_ranks(inputs, world);
    const wire::Layout L = wire::make_layout(2, world, false);
    const int64_t vote0 = wire::kHeaderBits + wire::kSlotVoteBit;
    const int64_t stage0 = wire::kHeaderBits + wire::kSlotStageBit;

    auto flip_root = [&](std::vector<int64_t>* b, int64_t i) {
      (*b)[L.root_offset + i / 63] ^= int64_t{1} << (i % 63);
    };
    // ROOT says rank 0 set a stage bit that no counter saw (slot 0's stage
    // is 0 everywhere).
    std::vector<int64_t> buf = good;
    flip_root(&buf, stage0);
    Decoded d = decode_all(buf, 2, world, wire::kAny);
    EXPECT(d.flag(wire::kFlagCorrupt));
    EXPECT((d.status(0) & wire::kStatusCorrupt) != 0);
    check_nothing_decided(d);

    // ROOT lacks a bit that every counter saw: in a slot (slot 1's stage
    // is 1) and in the header (the site is 0xC0FFEE on every rank).
    const int64_t set_bits[] = {wire::kHeaderBits + L.slot_bits + wire::kSlotStageBit,
                                wire::field_offset(wire::kFieldSite) + 1};
    for (int64_t i : set_bits) {
      CONTEXT("record bit " << i << " cleared in ROOT");
      buf = good;
      if (!EXPECT_EQ(wire::root_bit(buf.data(), L, i), uint64_t{1})) continue;
      flip_root(&buf, i);
      d = decode_all(buf, 2, world, wire::kAny);
      EXPECT(d.flag(wire::kFlagCorrupt));
      check_nothing_decided(d);
    }

    // ROOT has rank 0's vote, the counter none.
    {
      buf = good;
      const int64_t shift = (vote0 % L.counters_per_word) * L.counter_width;
      buf[L.counts_offset + vote0 / L.counters_per_word] &= ~(((int64_t{1} << L.counter_width) - 1) << shift);
      d = decode_all(buf, 2, world, wire::kAny);
      EXPECT(d.flag(wire::kFlagCorrupt));
      EXPECT((d.status(0) & wire::kStatusCorrupt) != 0);
      check_nothing_decided(d);
    }

    // ROOT says rank 0 voted no, but all W ranks counted yes: W yes votes include
    // rank 0's. With lanes rank 0's lane contradicts it too; without them (above
    // 64 ranks) the count is the only witness, and the slot's own check must see it.
    {
      buf = good;
      flip_root(&buf, vote0);
      d = decode_all(buf, 2, world, wire::kAny);
      EXPECT_EQ(d.slot(0)[wire::kSVotes], world);
      EXPECT_EQ(d.slot(0)[wire::kSRootVote], 0);
      EXPECT(d.flag(wire::kFlagCorrupt));
      EXPECT((d.status(0) & wire::kStatusCorrupt) != 0);
      check_nothing_decided(d);
    }

    // A vote counter above W (needs room above W in the counter).
    if ((int64_t{1} << L.counter_width) - 1 > world) {
      buf = good;
      const int64_t shift = (vote0 % L.counters_per_word) * L.counter_width;
      int64_t& word = buf[L.counts_offset + vote0 / L.counters_per_word];
      word = (word & ~(((int64_t{1} << L.counter_width) - 1) << shift)) |
             ((world + 1) << shift);
      d = decode_all(buf, 2, world, wire::kAny);
      EXPECT(d.flag(wire::kFlagCorrupt));
      check_nothing_decided(d);
    }

    // A vote in one lane that the counters do not have.
    if (L.exact) {
      buf = good;
      const int64_t g = (world - 1) * L.record_bits + vote0;
      buf[L.lanes_offset + g / 63] ^= int64_t{1} << (g % 63);
      d = decode_all(buf, 2, world, wire::kAny);
      EXPECT(d.flag(wire::kFlagCorrupt));
      check_nothing_decided(d);
    }
  }
}

// ---- every decode path against the independent oracle ---------------------

namespace {

// One way the ranks' inputs can differ; each reaches its own decode path.
enum Variant {
  kAgree,            // header ok, every slot's status from the votes alone
  kEdgeVotes,        // yes-counts at 0, 1, W/2, W/2 + 1, W - 1, W
  kStageDiverges,
  kTargetDiverges,
  kSeqMismatch,
  kSiteMismatch,
  kPolicyMismatch,
  kSlotsMismatch,    // one rank has 5 slots, the others 6 (same capacity): both views
  kWorldMismatch,
  kOnePoisonedValue,
  kOnePoisonedCaller,
  kTwoPoisoned,      // past 64 ranks: counted, not named
  kReasonWithoutPoison,
  kSlotPolicies,     // every slot its own policy (agreed), digests agreed, edge votes
  kSlotPolicyDiverges,
  kDigestDiverges,   // one rank's digest in slot 2, two ranks' in slot 5
  kNoGate,           // slot 1 has no gate on any rank, slot 4 on one rank only
  kBadPolicy,        // a policy code outside 0..3 poisons
  kBadDigest,        // a digest outside 0..2^32-1 poisons
  kNumVariants,
};

const char* const kVariantNames[kNumVariants] = {
    "agree", "edge votes", "stage diverges", "target diverges", "seq mismatch", "site mismatch",
    "policy mismatch", "slots mismatch", "world mismatch", "one poisoned by a value",
    "one poisoned by the caller", "two poisoned", "reason without poison bit", "slot policies",
    "slot policy diverges", "digest diverges", "no gate", "bad policy", "bad digest"};

std::vector<RankInput> variant_inputs(int v, int64_t world, int64_t policy, Rng& rng) {
  const int64_t n = 6;  // 5 slots have the same capacity, for the slot-count mismatch
  std::vector<RankInput> in(static_cast<size_t>(world), agreeing_input(n, world, policy));
  for (int64_t r = 0; r < world; ++r) {
    for (int64_t s = 0; s < n; ++s) in[r].votes[s] = rng.below(3) != 0;
  }
  // Two distinct ranks (one when W == 1); their ids + 1 often sum to <= W,
  // so a decoder that named "the" poisoned rank from that sum would be caught.
  const int64_t a = rng.below(world), b = world > 1 ? (a + 1 + rng.below(world - 1)) % world : a;
  switch (v) {
    case kEdgeVotes: {
      const int64_t counts[n] = {world / 2, world / 2 + 1, 0, world - 1, world, (world + 1) / 2};
      for (int64_t s = 0; s < n; ++s) {
        for (int64_t r = 0; r < world; ++r) in[r].votes[s] = (r + s) % world < counts[s];
      }
      break;
    }
    case kStageDiverges: in[a].stages[1] ^= 1 + rng.below(63); break;
    case kTargetDiverges: in[a].targets[3] ^= 1 + rng.below(63); in[b].targets[3] ^= 5; break;
    case kSeqMismatch: in[a].header.seq = (in[a].header.seq + 1) & wire::field_mask(wire::kFieldSeq); break;
    case kSiteMismatch: in[a].header.site ^= 0x80000001u; break;
    case kPolicyMismatch: in[a].header.policy = (in[a].header.policy + 1) % wire::kNumPolicies; break;
    case kSlotsMismatch: {
      RankInput fewer = agreeing_input(n - 1, world, policy);
      fewer.votes = std::vector<int64_t>(in[a].votes.begin(), in[a].votes.end() - 1);
      in[a] = fewer;
      break;
    }
    case kWorldMismatch: in[a].header.world = world + 1; break;
    case kOnePoisonedValue: in[a].stages[2] = 64 + rng.below(100); break;
    case kOnePoisonedCaller:
      in[a].header = header_values(41, 0xC0FFEE, policy, n, world, wire::kReasonCallerMin + rng.below(16));
      break;
    case kTwoPoisoned:
      in[a].votes[0] = 2;
      if (world > 1) in[b].targets[4] = -1;
      break;
    case kReasonWithoutPoison: in[a].header.reason = wire::kReasonCallerMin + 2; break;
    case kSlotPolicies:
    case kSlotPolicyDiverges:
    case kDigestDiverges: {
      const int64_t counts[n] = {world / 2, world / 2 + 1, 0, world - 1, world, (world + 1) / 2};
      std::vector<int64_t> digests(n);
      for (int64_t s = 0; s < n; ++s) digests[s] = static_cast<int64_t>(rng.next() & 0xFFFFFFFFull);
      for (int64_t r = 0; r < world; ++r) {
        in[r].policies = {0, 1, 2, 3, 2, 0};
        in[r].digests = digests;
        for (int64_t s = 0; s < n; ++s) in[r].votes[s] = (r + s) % world < counts[s];
      }
      if (v == kSlotPolicyDiverges) in[a].policies[3] = (in[a].policies[3] + 1 + rng.below(3)) % 4;
      if (v == kDigestDiverges) {
        in[a].digests[2] ^= static_cast<int64_t>(uint64_t{1} << rng.below(32));
        in[a].digests[5] ^= 0x80000000ll;
        in[b].digests[5] ^= 0x1ll;
      }
      break;
    }
    case kNoGate:
      for (int64_t r = 0; r < world; ++r) {
        in[r].targets[1] = wire::kNoGate;
        in[r].votes[1] = rng.below(2);
      }
      in[a].targets[4] = wire::kNoGate;
      in[a].votes[4] = 0;
      break;
    case kBadPolicy:
      for (int64_t r = 0; r < world; ++r) in[r].policies.assign(n, policy);
      in[a].policies[3] = 4 + rng.below(100);
      break;
    case kBadDigest:
      in[a].digests.assign(n, 7);
      in[a].digests[1] = rng.below(2) ? -1 : int64_t{1} << 32;
      break;
    default: break;
  }
  return in;
}

}  // namespace

TEST_CASE(the_slot_state_changes_the_size_and_nothing_it_decides) {
  // Inputs without per-slot policies or digests, sent once without the slot
  // state and once with it (the defaults: the call's policy, digest 0): the
  // same decisions and report, but for FLAG_SLOT_STATE. Ranks with fewer
  // slots are left out of the report comparison: their padding slots carry
  // policy 0 with the slot state and their call policy without (both views
  // are mismatched then, and decide nothing either way).
  Rng rng(0x51075);
  for (int64_t world : {1, 2, 3, 64, 65, 1024}) {
    for (int v = 0; v < kNumVariants; ++v) {
      if (v == kSlotPolicies || v == kSlotPolicyDiverges || v == kDigestDiverges || v == kBadPolicy ||
          v == kBadDigest) {
        continue;  // these send policies or digests: only the slot state carries them
      }
      const int64_t policy = v % wire::kNumPolicies;
      const std::vector<RankInput> inputs = variant_inputs(v, world, policy, rng);
      std::vector<int64_t> core, with_state;
      for (int64_t r = 0; r < world; ++r) {
        add_into(&core, pack_rank(inputs[r], r, world, false));
        add_into(&with_state, pack_rank(inputs[r], r, world, true));
      }
      EXPECT_LT(core.size(), with_state.size());
      CONTEXT("world " << world << ", " << kVariantNames[v]);
      const int64_t n = static_cast<int64_t>(inputs[0].votes.size());
      const Decoded a = decode_all(core, n, world, policy);
      const Decoded b = decode_all(with_state, n, world, policy);
      EXPECT(!a.slot_state && b.slot_state);
      EXPECT(!a.flag(wire::kFlagSlotState) && b.flag(wire::kFlagSlotState));
      EXPECT(a.decision == b.decision);
      if (v == kSlotsMismatch) continue;
      std::vector<int64_t> b_report = b.report;
      b_report[wire::kGFlags] &= ~wire::kFlagSlotState;
      for (size_t i = 0; i < a.report.size(); ++i) {
        CONTEXT("report word " << i);
        if (!EXPECT_EQ(a.report[i], b_report[i])) break;
      }
    }
  }
}

TEST_CASE(pack_matches_the_oracle) {
  Rng rng(0x0AC1E);
  for (int64_t world : {1, 2, 3, 4, 63, 64, 65, 127, 128, 1023, 1024, 1025, 4096, 65536}) {
    for (int v = 0; v < kNumVariants; ++v) {
      const std::vector<RankInput> inputs = variant_inputs(v, world, v % wire::kNumPolicies, rng);
      for (int64_t r : {int64_t{0}, world / 2, world - 1}) {
        CONTEXT("world " << world << ", " << kVariantNames[v] << ", rank " << r);
        const bool slot_state = carries_slot_state(inputs);
        EXPECT(pack_rank(inputs[r], r, world, slot_state) == oracle::buffer(inputs[r], r, world, slot_state));
      }
    }
  }
}

TEST_CASE(decode_paths_match_the_oracle) {
  // Every path of decode_global, decode_slot, decode_rank and finish_slot that
  // a sum of honest buffers reaches: header ok or not (each mismatch, one or
  // two poisoned ranks, a bare reason), each policy on edge vote counts, stage
  // and target divergence, with lanes (W <= 64) and without, read by rank 0,
  // by the odd rank and by the last rank.
  Rng rng(0x0AC1E5);
  for (int64_t world : {1, 2, 3, 4, 17, 63, 64, 65, 100, 127, 128, 1023, 1024, 1025, 4096}) {
    for (int v = 0; v < kNumVariants; ++v) {
      for (int64_t policy = 0; policy < wire::kNumPolicies; ++policy) {
        const std::vector<RankInput> inputs = variant_inputs(v, world, policy, rng);
        const std::vector<int64_t> sum = reduce_ranks(inputs, world);
        for (int64_t view = 0; view < world; ++view) {
          const int64_t n = static_cast<int64_t>(inputs[view].votes.size());
          // Rank 0, the last rank, and any rank whose slot count differs.
          if (view != 0 && view != world - 1 && n == static_cast<int64_t>(inputs[0].votes.size())) continue;
          CONTEXT("world " << world << ", " << kVariantNames[v] << ", policy " << policy << ", view of rank "
                           << view);
          const Decoded d = decode_all(sum, n, world, policy);
          expect_report_matches(d.report, d.decision, oracle::decode(inputs, n, policy));
        }
      }
    }
  }
}

int main(int argc, char** argv) { return run_all(argc, argv); }
