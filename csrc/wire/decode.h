// Decoding the reduced buffer into decisions and the report (report.h), and
// the one decode sequence both devices run (decode_buffer).
#pragma once

#include <cstdint>

#include "hd.h"
#include "layout.h"
#include "limits.h"
#include "read.h"
#include "report.h"

namespace esper_gate {
namespace wire {

EG_HD bool policy_passes(int64_t policy, uint64_t votes, uint64_t root_vote, uint64_t world) {
  switch (policy) {
    case kUnanimous: return votes == world;
    case kRank0: return root_vote == 1;
    case kMajority: return 2 * votes > world;
    case kAny: return votes >= 1;
    default: return false;
  }
}

// Copies the REASONS counters into REASON_COUNTS. Returns false when honest
// ranks cannot have sent them: a counter above the world size, or counts
// that do not add up to the number of poisoned ranks.
EG_HD bool decode_reason_counts(const int64_t* buf, const Layout& L, int64_t poison_count, int64_t* out) {
  const uint64_t W = static_cast<uint64_t>(L.world);
  bool sane = true;
  uint64_t total = 0;
  CounterCursor cursor = counters_at(buf, L, L.reasons_offset, 0);
  for (int64_t code = 1; code <= kReasonMax; ++code) {
    const uint64_t c = next_counter(buf, L, &cursor);
    out[code - 1] = static_cast<int64_t>(c);
    if (c > W) sane = false;
    total += c;
  }
  return sane && total == static_cast<uint64_t>(poison_count);
}

// Fills GLOBAL and REASON_COUNTS (reason_counts: kReportReasonWords words),
// except the slot counts and the corrupt bit that slots add. Returns true
// when the header is consistent: every rank present once, none poisoned, and
// all at the same (seq, site, policy, slots, world).
EG_HD bool decode_global(
    const int64_t* buf, const Layout& L, int64_t num_slots, int64_t policy, int64_t* g, int64_t* reason_counts) {
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
    out[kFRoot] = static_cast<int64_t>(s.root);
    out[kFAnd] = static_cast<int64_t>(s.all_and);
    out[kFOr] = static_cast<int64_t>(s.any_or);
    out[kFDifferLb] = s.differ_lb;
    out[kFEqual] = s.equal ? 1 : 0;
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
  const int64_t* slots = g + kGFieldBase + kGFieldStride * kFieldSlots;
  const int64_t* pol = g + kGFieldBase + kGFieldStride * kFieldPolicy;
  const int64_t* world = g + kGFieldBase + kGFieldStride * kFieldWorld;
  if (slots[kFEqual] && slots[kFRoot] != num_slots) {
    flags |= kFlagSlotsMismatch;
    all_equal = false;
  }
  if (pol[kFEqual] && pol[kFRoot] != policy) {
    flags |= kFlagPolicyMismatch;
    all_equal = false;
  }
  if (world[kFEqual] &&
      world[kFRoot] != static_cast<int64_t>(static_cast<uint64_t>(W) & field_mask(kFieldWorld))) {
    flags |= kFlagWorldMismatch;
    all_equal = false;
  }
  const int64_t poison_count = static_cast<int64_t>(counter_at(buf, L, field_offset(kFieldPoison)));
  const bool reason_nonzero = g[kGFieldBase + kGFieldStride * kFieldReason + kFOr] != 0;
  if (!decode_reason_counts(buf, L, poison_count, reason_counts)) corrupt = true;
  const bool poisoned = poison_count != 0 || poison_sum != 0 || reason_nonzero;
  if (poisoned) flags |= kFlagPoisoned;
  if (corrupt) flags |= kFlagCorrupt;
  if (L.exact) flags |= kFlagExact;
  if (L.slot_state) flags |= kFlagSlotState;
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
    out[f] = static_cast<int64_t>(lane_bits(buf, L, rank, field_offset(f), field_width(f)));
  }
  out[kRankWords - 1] = 0;
}

// Fills one slot's SLOT words (and its SLOT_RANKS row when exact and
// slot_ranks is given). Returns the status bits without kStatusDecided and
// kStatusDiverged, which need the global verdict (see finish_slot). The
// slot's policy is its own, read from the wire: ranks that disagree on it
// diverge like ranks at other stages, so rank 0's is everyone's when it
// decides anything. Without the slot state a slot's policy is its rank's
// call policy (the header field, read the same way) and its digest is 0;
// with lanes, call_policies holds each rank's, read once from its lane.
EG_HD int64_t decode_slot(
    const int64_t* buf, const Layout& L, int64_t s, int64_t* out, int64_t* slot_ranks,
    const uint8_t* call_policies) {
  const int64_t W = L.world;
  const int64_t off = kHeaderBits + s * L.slot_bits;
  // Rank 0's whole slot from ROOT, then the slot's counters in record order.
  const uint64_t root = root_bits(buf, L, off, L.slot_bits);
  CounterCursor c = counters_at(buf, L, L.counts_offset, off);
  const uint64_t votes = next_counter(buf, L, &c);
  const uint64_t root_vote = (root >> kSlotVoteBit) & 1u;
  const FieldSummary st = summarize_counters(buf, L, &c, (root >> kSlotStageBit) & kMaxId, kIdBits);
  const FieldSummary tg = summarize_counters(buf, L, &c, (root >> kSlotTargetBit) & kMaxId, kIdBits);
  const FieldSummary po =
      L.slot_state
          ? summarize_counters(buf, L, &c, (root >> kSlotPolicyBit) & field_mask(kFieldPolicy), kPolicyWidth)
          : summarize_field(buf, L, kPolicyOffset, kPolicyWidth);
  const FieldSummary dg = L.slot_state
                              ? summarize_counters(buf, L, &c, (root >> kSlotDigestBit) & kDigestMask, kDigestBits)
                              : FieldSummary{0, 0, 0, 0, true, true};
  bool sane = st.sane && tg.sane && po.sane && dg.sane && votes <= static_cast<uint64_t>(W) &&
              !(root_vote == 1 && votes == 0) && !(root_vote == 0 && votes == static_cast<uint64_t>(W));
  int64_t stage_differ = st.differ_lb;
  int64_t target_differ = tg.differ_lb;
  int64_t policy_differ = po.differ_lb;
  int64_t digest_differ = dg.differ_lb;
  int64_t key_differ = st.differ_lb;
  if (tg.differ_lb > key_differ) key_differ = tg.differ_lb;
  if (po.differ_lb > key_differ) key_differ = po.differ_lb;
  if (dg.differ_lb > key_differ) key_differ = dg.differ_lb;
  if (L.exact) {
    // Exact per-rank values; also cross-check them against the counters.
    stage_differ = target_differ = policy_differ = digest_differ = key_differ = 0;
    uint64_t lane_votes = 0;
    uint64_t stage_and = kMaxId, stage_or = 0, target_and = kMaxId, target_or = 0;
    uint64_t policy_and = field_mask(kFieldPolicy), policy_or = 0, digest_and = kDigestMask, digest_or = 0;
    for (int64_t r = 0; r < W; ++r) {
      const uint64_t rec = lane_bits(buf, L, r, off, L.slot_bits);
      const uint64_t v = (rec >> kSlotVoteBit) & 1u;
      const uint64_t sr = (rec >> kSlotStageBit) & kMaxId;
      const uint64_t tr = (rec >> kSlotTargetBit) & kMaxId;
      const uint64_t pr = L.slot_state ? (rec >> kSlotPolicyBit) & field_mask(kFieldPolicy) : call_policies[r];
      const uint64_t dr = L.slot_state ? (rec >> kSlotDigestBit) & kDigestMask : 0;
      if (slot_ranks != nullptr) slot_ranks[r] = slot_entry(v, sr, tr, pr, dr);
      lane_votes += v;
      stage_and &= sr;
      stage_or |= sr;
      target_and &= tr;
      target_or |= tr;
      policy_and &= pr;
      policy_or |= pr;
      digest_and &= dr;
      digest_or |= dr;
      if (r == 0 && (v != root_vote || sr != st.root || tr != tg.root || pr != po.root || dr != dg.root)) {
        sane = false;
      }
      if (sr != st.root) ++stage_differ;
      if (tr != tg.root) ++target_differ;
      if (pr != po.root) ++policy_differ;
      if (dr != dg.root) ++digest_differ;
      if (sr != st.root || tr != tg.root || pr != po.root || dr != dg.root) ++key_differ;
    }
    if (lane_votes != votes || stage_and != st.all_and || stage_or != st.any_or ||
        target_and != tg.all_and || target_or != tg.any_or || policy_and != po.all_and ||
        policy_or != po.any_or || digest_and != dg.all_and || digest_or != dg.any_or) {
      sane = false;
    }
  }
  const bool passed = policy_passes(static_cast<int64_t>(po.root), votes, root_vote, static_cast<uint64_t>(W));
  int64_t status = 0;
  if (!st.equal) status |= kStatusStageDiffers;
  if (!tg.equal) status |= kStatusTargetDiffers;
  if (!po.equal) status |= kStatusPolicyDiffers;
  if (!dg.equal) status |= kStatusDigestDiffers;
  if (tg.equal && tg.root == static_cast<uint64_t>(kNoGate)) status |= kStatusNoGate;
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
  out[kSRootPolicy] = static_cast<int64_t>(po.root);
  out[kSPolicyAnd] = static_cast<int64_t>(po.all_and);
  out[kSPolicyOr] = static_cast<int64_t>(po.any_or);
  out[kSPolicyDiffer] = policy_differ;
  out[kSRootDigest] = static_cast<int64_t>(dg.root);
  out[kSDigestAnd] = static_cast<int64_t>(dg.all_and);
  out[kSDigestOr] = static_cast<int64_t>(dg.any_or);
  out[kSDigestDiffer] = digest_differ;
  return status;
}

// The verdict for one slot once the global state is known. A slot is decided
// only when the whole call is consistent and trustworthy, every rank holds the
// same stage, target, policy and digest, some rank had a gate there, and the
// policy passes on the votes.
EG_HD int64_t finish_slot(int64_t status, bool header_ok, bool any_corrupt) {
  const bool same_state = (status & kStatusStateDiffers) == 0;
  const bool trusted = header_ok && !any_corrupt;
  if (!(trusted && same_state)) status |= kStatusDiverged;
  if (trusted && same_state && (status & kStatusPolicyPassed) && !(status & kStatusNoGate)) {
    status |= kStatusDecided;
  }
  return status;
}

// State the decode workers share (shared memory on the device).
struct DecodeShared {
  int header_ok;    // decode_global's verdict, before the slots are seen
  int any_corrupt;  // slots whose counters are inconsistent (only != 0 matters)
  int diverged;
  int decided;
  // Without the slot state and with lanes: each rank's call policy, which is
  // every one of its slots' policy (read once here, not once per slot).
  uint8_t call_policies[kMaxExactWorld];
};

// The one decode sequence: global (with the reason counts), then per slot, finish, the corrupt flag,
// then per rank. Each step needs the one before it complete on every worker,
// hence the syncs. rep has report_words(num_slots, L.world) words; decision
// num_slots entries (bool or uint8_t). Loop is a policy from loops.h.
template <typename Loop, typename DecisionT>
EG_HD void decode_buffer(
    const Loop& loop, const int64_t* buf, const Layout& L, int64_t num_slots, int64_t policy,
    DecisionT* decision, int64_t* rep, DecodeShared* sh) {
  const int64_t world = L.world;
  if (loop.leader()) {
    sh->header_ok =
        decode_global(buf, L, num_slots, policy, rep, rep + reason_counts_offset(num_slots, world)) ? 1 : 0;
    sh->any_corrupt = 0;
    sh->diverged = 0;
    sh->decided = 0;
    if (L.exact && !L.slot_state) {
      for (int64_t r = 0; r < world; ++r) {
        sh->call_policies[r] = static_cast<uint8_t>(lane_bits(buf, L, r, kPolicyOffset, kPolicyWidth));
      }
    }
  }
  loop.sync();
  int64_t* slot_ranks = L.exact ? rep + slot_ranks_offset(num_slots, world) : nullptr;
  loop.for_each(num_slots, [&](int64_t s) {
    const int64_t status = decode_slot(
        buf, L, s, rep + slots_offset() + kSlotWords * s,
        slot_ranks ? slot_ranks + s * world : nullptr, sh->call_policies);
    if (status & kStatusCorrupt) loop.add_into(&sh->any_corrupt, 1);
  });
  loop.sync();
  loop.for_each(num_slots, [&](int64_t s) {
    int64_t* status = rep + slots_offset() + kSlotWords * s + kSStatus;
    *status = finish_slot(*status, sh->header_ok != 0, sh->any_corrupt != 0);
    const bool d = (*status & kStatusDecided) != 0;
    decision[s] = d;
    if (*status & kStatusDiverged) loop.add_into(&sh->diverged, 1);
    if (d) loop.add_into(&sh->decided, 1);
  });
  loop.sync();
  if (loop.leader()) {
    if (sh->any_corrupt) rep[kGFlags] = (rep[kGFlags] | kFlagCorrupt) & ~kFlagHeaderOk;
    rep[kGDivergedSlots] = sh->diverged;
    rep[kGDecidedSlots] = sh->decided;
  }
  if (L.exact) {
    loop.for_each(world, [&](int64_t r) {
      decode_rank(buf, L, r, rep + ranks_offset(num_slots) + kRankWords * r);
    });
  }
}

}  // namespace wire
}  // namespace esper_gate
