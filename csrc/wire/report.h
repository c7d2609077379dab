// The report decode writes: word indices, flag and status bits, the per-rank
// slot entry and where each section starts. esper_gate/report.py reads it.
//
// report = [GLOBAL (kGlobalWords) | SLOTS (kSlotWords x S) |
//           RANKS (kRankWords x W) and SLOT_RANKS (S x W), both only when exact |
//           REASON_COUNTS (kReportReasonWords)]
#pragma once

#include <cstdint>

#include "hd.h"
#include "layout.h"
#include "limits.h"

namespace esper_gate {
namespace wire {

constexpr int64_t kGlobalWords = 48;
constexpr int64_t kSlotWords = 20;
constexpr int64_t kRankWords = 8;
// REASON_COUNTS: word code - 1 holds how many ranks were poisoned for reason
// code 1..kReasonMax, at every world size.
constexpr int64_t kReportReasonWords = kReasonMax;

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
constexpr int64_t kGFieldBase = 10;  // + kGFieldStride * field + FieldWord
constexpr int64_t kGFieldStride = 5;
// The words kept per header field, in order.
enum FieldWord : int64_t {
  kFRoot = 0,
  kFAnd = 1,
  kFOr = 2,
  kFDifferLb = 3,
  kFEqual = 4,
};

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
// The buffer carried the slot state (per-slot policies and digests); without
// it every slot's policy is its rank's call policy and every digest 0.
constexpr int64_t kFlagSlotState = 1 << 9;

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
constexpr int64_t kSKeyDiffer = 11;    // (stage, target, policy, digest) differs from rank 0's
constexpr int64_t kSRootPolicy = 12;   // the slot's policy code on rank 0
constexpr int64_t kSPolicyAnd = 13;
constexpr int64_t kSPolicyOr = 14;
constexpr int64_t kSPolicyDiffer = 15;
constexpr int64_t kSRootDigest = 16;   // the slot's state digest on rank 0
constexpr int64_t kSDigestAnd = 17;
constexpr int64_t kSDigestOr = 18;
constexpr int64_t kSDigestDiffer = 19;

// SLOT status bits.
constexpr int64_t kStatusDecided = 1 << 0;
constexpr int64_t kStatusDiverged = 1 << 1;
constexpr int64_t kStatusStageDiffers = 1 << 2;
constexpr int64_t kStatusTargetDiffers = 1 << 3;
constexpr int64_t kStatusPolicyPassed = 1 << 4;
constexpr int64_t kStatusCorrupt = 1 << 5;
constexpr int64_t kStatusPolicyDiffers = 1 << 6;
constexpr int64_t kStatusDigestDiffers = 1 << 7;
// Every rank sent kNoGate as the target: nothing to decide (never DECIDED).
constexpr int64_t kStatusNoGate = 1 << 8;
// Any of these on a slot makes it diverged.
constexpr int64_t kStatusStateDiffers =
    kStatusStageDiffers | kStatusTargetDiffers | kStatusPolicyDiffers | kStatusDigestDiffers;

// SLOT_RANKS entry, one word per (slot, rank), kSlotBits bits: target in the
// low kIdBits, then stage, vote, policy and digest at their shifts.
constexpr int64_t kSlotEntryIdMask = kMaxId;
constexpr int64_t kSlotEntryStageShift = kIdBits;
constexpr int64_t kSlotEntryVoteShift = 2 * kIdBits;
constexpr int64_t kSlotEntryPolicyShift = kSlotEntryVoteShift + 1;
constexpr int64_t kSlotEntryDigestShift = kSlotEntryPolicyShift + kPolicyWidth;
static_assert(kSlotEntryDigestShift + kDigestBits <= 63, "a slot entry must stay a non-negative int64");

EG_HD int64_t slot_entry(uint64_t vote, uint64_t stage, uint64_t target, uint64_t policy, uint64_t digest) {
  return static_cast<int64_t>(((vote & 1u) << kSlotEntryVoteShift) |
                              ((stage & kSlotEntryIdMask) << kSlotEntryStageShift) |
                              (target & kSlotEntryIdMask) |
                              ((policy & field_mask(kFieldPolicy)) << kSlotEntryPolicyShift) |
                              ((digest & kDigestMask) << kSlotEntryDigestShift));
}

// REASON_COUNTS comes last, after the sections only exact reports have.
EG_HD int64_t reason_counts_offset(int64_t num_slots, int64_t world) {
  int64_t n = kGlobalWords + kSlotWords * num_slots;
  if (world <= kMaxExactWorld) n += kRankWords * world + num_slots * world;
  return n;
}

EG_HD int64_t report_words(int64_t num_slots, int64_t world) {
  return reason_counts_offset(num_slots, world) + kReportReasonWords;
}

EG_HD int64_t slots_offset() { return kGlobalWords; }
EG_HD int64_t ranks_offset(int64_t num_slots) { return kGlobalWords + kSlotWords * num_slots; }
EG_HD int64_t slot_ranks_offset(int64_t num_slots, int64_t world) {
  return ranks_offset(num_slots) + kRankWords * world;
}

}  // namespace wire
}  // namespace esper_gate
