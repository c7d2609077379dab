// An independent oracle for the wire format: what one rank's buffer must
// hold, and what decode must report, computed from what the inputs mean
// (who holds which stage, who voted what), without calling any wire::
// packing or decoding function. wire_sim.h runs the same wire:: functions as
// the kernels, so comparing the two proves only that the loops match; the
// checks that count compare a kernel, or wire_sim, with this file.
//
// It uses the wire:: names of report words and status bits (the report's
// vocabulary, pinned by test_wire_format) and the RankInput of wire_sim.h.
// Field widths and bit positions are written out here from
// docs/wire-format.md rather than read from field_offset/field_width.
// It models sums of honest buffers; corrupt sums have their own tests.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "check.h"
#include "wire_sim.h"

namespace eg_test {
namespace oracle {

// Header fields in record order: seq, site, policy, slots, world, poison, reason.
constexpr int kFields = 7;
// slots holds 1..1024 (11 bits), world 1..65,536 (17 bits).
constexpr int kWidth[kFields] = {32, 32, 2, 11, 17, 1, 5};
constexpr int kWorldField = 4;
constexpr int kHeaderBits = 100;
constexpr int kReasonCodes = 31;  // codes 1..31 of the 5-bit reason field
// vote, then 6 bits of stage, 6 of target (13 bits), and in a call that
// carries the slot state 2 of the slot's policy and 32 of its state digest
constexpr int kSlotCoreBits = 13;
constexpr int kSlotBits = 47;
constexpr int kDigestBits = 32;
constexpr int64_t kNoGate = 63;  // the target id of a slot with no gate this call
// A per-rank slot entry of the exact report: digest, policy, vote, stage,
// target from the top.
constexpr int kEntryDigestShift = 15;
constexpr int kEntryPolicyShift = 13;
constexpr int kEntryVoteShift = 12;
constexpr int kEntryStageShift = 6;

inline int64_t capacity(int64_t num_slots) {
  int64_t c = 1;
  while (c < num_slots) c *= 2;
  return c;
}

inline int64_t bits_for(int64_t v) {
  int64_t n = 0;
  for (; v > 0; v /= 2) ++n;
  return n;
}

struct Slot {
  int64_t vote, stage, target, policy, digest;
};

// One rank's record as values: the header it sends and its slots, padded with
// zeros to the capacity.
struct Record {
  uint64_t header[kFields];
  std::vector<Slot> slots;
};

// The reason a slot's values are bad, in the order the kernel looks: vote,
// stage, target, policy, digest.
inline int64_t slot_reason(int64_t vote, int64_t stage, int64_t target, int64_t policy, int64_t digest) {
  if (vote != 0 && vote != 1) return 1;
  if (stage < 0 || stage > 63) return 2;
  if (target < 0 || target > 63) return 3;
  if (policy < 0 || policy > 3) return 5;
  if (digest < 0 || digest > 0xFFFFFFFFll) return 6;
  return 0;
}

// Without the slot state a slot's policy is the rank's call policy, padding
// included (the decoder reads it from the header), and its digest 0.
inline Record record(const RankInput& in, int64_t cap, bool slot_state) {
  const int64_t n = static_cast<int64_t>(in.votes.size());
  uint64_t reason = in.header.reason, poison = in.header.poison;
  if (reason == 0) {
    for (int64_t s = 0; s < n && reason == 0; ++s) {
      reason = static_cast<uint64_t>(
          slot_reason(in.votes[s], in.stages[s], in.targets[s], in.policy(s), in.digest(s)));
    }
    if (reason != 0) poison = 1;
  }
  const uint64_t raw[kFields] = {in.header.seq, in.header.site, in.header.policy, in.header.slots,
                                 in.header.world, poison, reason};
  Record r;
  for (int f = 0; f < kFields; ++f) r.header[f] = raw[f] & ((uint64_t{1} << kWidth[f]) - 1);
  const int64_t call_policy = static_cast<int64_t>(r.header[2]);
  for (int64_t s = 0; s < cap; ++s) {
    // Two's complement low bits: -1 as a stage reads as 63, as a vote as 1.
    if (!slot_state) {
      r.slots.push_back(s < n ? Slot{in.votes[s] & 1, in.stages[s] & 63, in.targets[s] & 63, call_policy, 0}
                              : Slot{0, 0, 0, call_policy, 0});
      continue;
    }
    r.slots.push_back(s < n ? Slot{in.votes[s] & 1, in.stages[s] & 63, in.targets[s] & 63, in.policy(s) & 3,
                                   in.digest(s) & 0xFFFFFFFFll}
                            : Slot{0, 0, 0, 0, 0});
  }
  return r;
}

// The record as a bit string: the header fields one after the other, least
// significant bit first, then 13 bits per slot, or 47 with the slot state.
inline std::vector<int> record_bits(const Record& r, bool slot_state) {
  std::vector<int> bits;
  for (int f = 0; f < kFields; ++f) {
    for (int b = 0; b < kWidth[f]; ++b) bits.push_back(static_cast<int>((r.header[f] >> b) & 1));
  }
  for (const Slot& s : r.slots) {
    bits.push_back(static_cast<int>(s.vote));
    for (int b = 0; b < 6; ++b) bits.push_back(static_cast<int>((s.stage >> b) & 1));
    for (int b = 0; b < 6; ++b) bits.push_back(static_cast<int>((s.target >> b) & 1));
    if (!slot_state) continue;
    for (int b = 0; b < 2; ++b) bits.push_back(static_cast<int>((s.policy >> b) & 1));
    for (int b = 0; b < kDigestBits; ++b) bits.push_back(static_cast<int>((s.digest >> b) & 1));
  }
  return bits;
}

// A call carries the slot state when some rank sends policies or digests
// (the others then send the defaults, as a GateSync with the slot state does).
inline bool call_slot_state(const std::vector<RankInput>& inputs) {
  for (const RankInput& in : inputs) {
    if (!in.policies.empty() || !in.digests.empty()) return true;
  }
  return false;
}

// Rank `rank`'s contribution to the all_reduce: presence, rank id + 1,
// poisoned rank id + 1, then COUNTS (a bit_length(W)-bit counter per record
// bit, as many per word as fit in 63 bits), ROOT (rank 0's record, 63 bits
// per word), up to 64 ranks LANES (rank r's record at bit r * R), and REASONS
// (a counter like COUNTS' for each reason code 1..31, where a rank whose
// poison bit is set adds 1 under its reason).
inline std::vector<int64_t> buffer(const RankInput& in, int64_t rank, int64_t world, bool slot_state) {
  const Record rec = record(in, capacity(static_cast<int64_t>(in.votes.size())), slot_state);
  const std::vector<int> bits = record_bits(rec, slot_state);
  const int64_t R = static_cast<int64_t>(bits.size());
  const int64_t cw = bits_for(world), per_word = 63 / cw;
  const int64_t counts = (R + per_word - 1) / per_word, root = (R + 62) / 63;
  const int64_t lanes = world <= 64 ? (world * R + 62) / 63 : 0;
  const int64_t reasons = (kReasonCodes + per_word - 1) / per_word;
  std::vector<uint64_t> out(static_cast<size_t>(3 + counts + root + lanes + reasons), 0);
  const uint64_t code = rec.header[6];
  if (rec.header[5] && code != 0) {
    out[3 + counts + root + lanes + (code - 1) / per_word] |= uint64_t{1} << (((code - 1) % per_word) * cw);
  }
  out[0] = 1;
  out[1] = static_cast<uint64_t>(rank + 1);
  // As declared, like the kernel: a poison flag of 2 counts as poisoned here
  // although only its low bit reaches the header.
  out[2] = in.header.poison != 0 || rec.header[5] ? static_cast<uint64_t>(rank + 1) : 0;
  for (int64_t i = 0; i < R; ++i) {
    const uint64_t bit = static_cast<uint64_t>(bits[i]);
    out[3 + i / per_word] |= bit << ((i % per_word) * cw);
    if (rank == 0) out[3 + counts + i / 63] |= bit << (i % 63);
    if (lanes) {
      const int64_t g = rank * R + i;
      out[3 + counts + root + g / 63] |= bit << (g % 63);
    }
  }
  return std::vector<int64_t>(out.begin(), out.end());
}

struct Summary {
  int64_t root, all_and, any_or, differ_lb;
  bool equal;
};

// What the counters can say about one field: rank 0's value, AND, OR, and,
// per bit, how many ranks differ from rank 0 (the largest of those is a lower
// bound of the ranks whose value differs).
inline Summary summarize(const std::vector<int64_t>& values, int width) {
  Summary s{values[0], (int64_t{1} << width) - 1, 0, 0, true};
  for (int64_t v : values) {
    s.all_and &= v;
    s.any_or |= v;
    s.equal = s.equal && v == values[0];
  }
  for (int b = 0; b < width; ++b) {
    int64_t d = 0;
    for (int64_t v : values) d += ((v >> b) & 1) != ((values[0] >> b) & 1);
    if (d > s.differ_lb) s.differ_lb = d;
  }
  return s;
}

struct Expected {
  std::vector<int64_t> report;
  std::vector<uint8_t> decision;
};

// What a rank that synchronizes `num_slots` slots under `policy` decodes from
// the sum of every rank's buffer (inputs[r] is rank r's input).
inline Expected decode(const std::vector<RankInput>& inputs, int64_t num_slots, int64_t policy) {
  const int64_t W = static_cast<int64_t>(inputs.size());
  const bool exact = W <= 64;
  const bool slot_state = call_slot_state(inputs);
  const int64_t cap = capacity(num_slots);
  std::vector<Record> recs;
  for (const RankInput& in : inputs) recs.push_back(record(in, cap, slot_state));

  const int64_t slot_words = 20, rank_words = 8;
  Expected e;
  const int64_t reason_counts = 48 + slot_words * num_slots + (exact ? rank_words * W + num_slots * W : 0);
  e.report.assign(static_cast<size_t>(reason_counts + kReasonCodes), 0);
  int64_t* g = e.report.data();

  // Header fields: mismatches, and the values everyone agreed on that are not ours.
  const int64_t mismatch_flag[5] = {wire::kFlagSeqMismatch, wire::kFlagSiteMismatch,
                                    wire::kFlagPolicyMismatch, wire::kFlagSlotsMismatch,
                                    wire::kFlagWorldMismatch};
  const int64_t ours[5] = {-1, -1, policy, num_slots, W & ((int64_t{1} << kWidth[kWorldField]) - 1)};
  int64_t flags = 0;
  bool all_equal = true;
  for (int f = 0; f < kFields; ++f) {
    std::vector<int64_t> values;
    for (const Record& r : recs) values.push_back(static_cast<int64_t>(r.header[f]));
    const Summary s = summarize(values, kWidth[f]);
    int64_t* out = g + wire::kGFieldBase + wire::kGFieldStride * f;
    out[0] = s.root;
    out[1] = s.all_and;
    out[2] = s.any_or;
    out[3] = s.differ_lb;
    out[4] = s.equal;
    if (f < 5 && (!s.equal || (ours[f] >= 0 && s.root != ours[f]))) {
      flags |= mismatch_flag[f];
      all_equal = false;
    }
  }
  std::vector<int64_t> poisoned;
  bool any_reason = false;
  for (int64_t r = 0; r < W; ++r) {
    if (recs[r].header[5]) poisoned.push_back(r);
    any_reason = any_reason || recs[r].header[6] != 0;
    if (recs[r].header[5] && recs[r].header[6] != 0) ++g[reason_counts + recs[r].header[6] - 1];
  }
  const bool is_poisoned = !poisoned.empty() || any_reason;
  if (is_poisoned) flags |= wire::kFlagPoisoned;
  if (exact) flags |= wire::kFlagExact;
  if (slot_state) flags |= wire::kFlagSlotState;
  const bool header_ok = !is_poisoned && all_equal;
  if (header_ok) flags |= wire::kFlagHeaderOk;

  int64_t decided = 0, diverged = 0;
  for (int64_t s = 0; s < num_slots; ++s) {
    std::vector<int64_t> votes, stages, targets, policies, digests;
    for (const Record& r : recs) {
      votes.push_back(r.slots[s].vote);
      stages.push_back(r.slots[s].stage);
      targets.push_back(r.slots[s].target);
      policies.push_back(r.slots[s].policy);
      digests.push_back(r.slots[s].digest);
    }
    int64_t yes = 0;
    for (int64_t v : votes) yes += v;
    const Summary st = summarize(stages, 6), tg = summarize(targets, 6), po = summarize(policies, 2),
                  dg = summarize(digests, kDigestBits);
    int64_t stage_differ = st.differ_lb, target_differ = tg.differ_lb, policy_differ = po.differ_lb,
            digest_differ = dg.differ_lb;
    int64_t key_differ = std::max(std::max(st.differ_lb, tg.differ_lb), std::max(po.differ_lb, dg.differ_lb));
    if (exact) {
      stage_differ = target_differ = policy_differ = digest_differ = key_differ = 0;
      for (int64_t r = 0; r < W; ++r) {
        stage_differ += stages[r] != stages[0];
        target_differ += targets[r] != targets[0];
        policy_differ += policies[r] != policies[0];
        digest_differ += digests[r] != digests[0];
        key_differ += stages[r] != stages[0] || targets[r] != targets[0] || policies[r] != policies[0] ||
                      digests[r] != digests[0];
      }
    }
    // The slot's own policy decides (rank 0's; a slot whose ranks differ on it
    // diverges whatever the votes say).
    const int64_t slot_policy = policies[0];
    const bool passed = slot_policy == wire::kUnanimous ? yes == W
                        : slot_policy == wire::kRank0   ? votes[0] == 1
                        : slot_policy == wire::kMajority ? 2 * yes > W
                                                         : yes >= 1;
    const bool same_state = st.equal && tg.equal && po.equal && dg.equal;
    const bool no_gate = tg.equal && targets[0] == kNoGate;
    const bool decide = header_ok && same_state && passed && !no_gate;
    int64_t status = 0;
    if (!st.equal) status |= wire::kStatusStageDiffers;
    if (!tg.equal) status |= wire::kStatusTargetDiffers;
    if (!po.equal) status |= wire::kStatusPolicyDiffers;
    if (!dg.equal) status |= wire::kStatusDigestDiffers;
    if (no_gate) status |= wire::kStatusNoGate;
    if (passed) status |= wire::kStatusPolicyPassed;
    if (!(header_ok && same_state)) status |= wire::kStatusDiverged;
    if (decide) status |= wire::kStatusDecided;
    decided += decide;
    diverged += !(header_ok && same_state);
    e.decision.push_back(decide);
    int64_t* w = g + 48 + slot_words * s;
    const int64_t words[20] = {status,       yes,           votes[0],      stages[0],  targets[0],
                               st.all_and,   st.any_or,     tg.all_and,    tg.any_or,  stage_differ,
                               target_differ, key_differ,   policies[0],   po.all_and, po.any_or,
                               policy_differ, digests[0],   dg.all_and,    dg.any_or,  digest_differ};
    for (int k = 0; k < 20; ++k) w[k] = words[k];
    if (exact) {
      for (int64_t r = 0; r < W; ++r) {
        g[48 + slot_words * num_slots + rank_words * W + s * W + r] =
            (digests[r] << kEntryDigestShift) | (policies[r] << kEntryPolicyShift) |
            (votes[r] << kEntryVoteShift) | (stages[r] << kEntryStageShift) | targets[r];
      }
    }
  }
  if (exact) {
    for (int64_t r = 0; r < W; ++r) {
      for (int f = 0; f < kFields; ++f) {
        g[48 + slot_words * num_slots + rank_words * r + f] = static_cast<int64_t>(recs[r].header[f]);
      }
    }
  }
  g[wire::kGFlags] = flags;
  g[wire::kGPresence] = W;
  g[wire::kGPoisonCount] = static_cast<int64_t>(poisoned.size());
  g[wire::kGPoisonedRank] = poisoned.size() == 1 ? poisoned[0] : -1;
  g[wire::kGWorld] = W;
  g[wire::kGSlots] = num_slots;
  g[wire::kGCapacity] = cap;
  g[wire::kGDivergedSlots] = diverged;
  g[wire::kGDecidedSlots] = decided;
  g[wire::kGPolicy] = policy;
  return e;
}

}  // namespace oracle

// Word-by-word comparison of a decoded report with the oracle's; stops at
// the first differing word so one bug does not print a thousand lines.
inline bool expect_report_matches(const std::vector<int64_t>& got_report,
                                  const std::vector<uint8_t>& got_decision,
                                  const oracle::Expected& want) {
  bool ok = EXPECT_EQ(got_report.size(), want.report.size()) &
            EXPECT_EQ(got_decision.size(), want.decision.size());
  for (size_t i = 0; ok && i < want.report.size(); ++i) {
    CONTEXT("report word " << i);
    ok = EXPECT_EQ(got_report[i], want.report[i]);
  }
  for (size_t s = 0; ok && s < want.decision.size(); ++s) {
    CONTEXT("decision of slot " << s);
    ok = EXPECT_EQ(static_cast<int>(got_decision[s]), static_cast<int>(want.decision[s]));
  }
  return ok;
}

}  // namespace eg_test
