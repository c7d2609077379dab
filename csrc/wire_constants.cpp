// What Python reads of the wire format from C++, as JSON:
//   esper_gate::wire_constants() -> str: every constant of the wire format and
//     the report, keyed by the names in esper_gate/wire.py. tests/test_wire.py
//     compares the two, so the constants the report parser uses cannot drift
//     from the kernels.
//   esper_gate::wire_sizes(num_slots, world_size, slot_state) -> str: the
//     buffer layout (wire::make_layout) and the report's size and section offsets
//     (wire/report.h) for one call, which esper_gate/wire.py serves to Python
//     instead of computing them a second time.
#include <torch/library.h>

#include <sstream>
#include <string>

#include "esper_gate.h"
#include "wire/layout.h"
#include "wire/limits.h"
#include "wire/pack.h"
#include "wire/report.h"

namespace esper_gate {
namespace {

class JsonObject {
 public:
  JsonObject& add(const char* key, int64_t v) {
    start(key);
    out_ << v;
    return *this;
  }
  // A list of [name, offset, width] rows, as wire.HEADER_FIELDS.
  JsonObject& add_fields(const char* key) {
    static const char* const names[wire::kNumHeaderFields] = {
        "seq", "site", "policy", "slots", "world", "poison", "reason"};
    start(key);
    out_ << "[";
    for (int f = 0; f < wire::kNumHeaderFields; ++f) {
      out_ << (f ? ", " : "") << "[\"" << names[f] << "\", " << wire::field_offset(f) << ", "
           << wire::field_width(f) << "]";
    }
    out_ << "]";
    return *this;
  }
  JsonObject& add_policies(const char* key) {
    // Indexed by the Policy code, as wire.POLICIES.
    static const char* const names[wire::kNumPolicies] = {"unanimous", "rank0", "majority", "any"};
    static_assert(wire::kUnanimous == 0 && wire::kRank0 == 1 && wire::kMajority == 2 && wire::kAny == 3,
                  "names above are listed in Policy code order");
    start(key);
    out_ << "[";
    for (int p = 0; p < wire::kNumPolicies; ++p) out_ << (p ? ", " : "") << "\"" << names[p] << "\"";
    out_ << "]";
    return *this;
  }
  std::string str() const { return out_.str() + "}"; }

 private:
  void start(const char* key) {
    out_ << (first_ ? "{" : ", ") << "\"" << key << "\": ";
    first_ = false;
  }
  std::ostringstream out_;
  bool first_ = true;
};

std::string wire_constants() {
  using namespace wire;
  JsonObject j;
  // limits
  j.add("MAX_SLOTS", kMaxSlots).add("MAX_WORLD", kMaxWorld).add("MAX_EXACT_WORLD", kMaxExactWorld)
      .add("MAX_ID", kMaxId).add("ID_BITS", kIdBits).add("BITS_PER_WORD", kBitsPerWord)
      .add("NO_GATE", kNoGate).add("DIGEST_BITS", kDigestBits);
  j.add_policies("POLICIES");
  j.add("REASON_NONE", kReasonNone).add("REASON_VOTE", kReasonVote).add("REASON_STAGE", kReasonStage)
      .add("REASON_TARGET", kReasonTarget).add("REASON_SITE", kReasonSite)
      .add("REASON_POLICY", kReasonPolicy).add("REASON_DIGEST", kReasonDigest)
      .add("REASON_CALLER_MIN", kReasonCallerMin).add("REASON_MAX", kReasonMax);
  // record and buffer layout
  j.add_fields("HEADER_FIELDS");
  j.add("HEADER_BITS", kHeaderBits).add("SLOT_BITS", kSlotBits).add("SLOT_CORE_BITS", kSlotCoreBits)
      .add("SLOT_VOTE_BIT", kSlotVoteBit)
      .add("SLOT_STAGE_BIT", kSlotStageBit).add("SLOT_TARGET_BIT", kSlotTargetBit)
      .add("SLOT_POLICY_BIT", kSlotPolicyBit).add("SLOT_DIGEST_BIT", kSlotDigestBit)
      .add("FIXED_WORDS", kFixedWords).add("WORD_PRESENCE", kWordPresence)
      .add("WORD_RANK_SUM", kWordRankSum).add("WORD_POISON_RANK", kWordPoisonRank);
  // report layout
  j.add("GLOBAL_WORDS", kGlobalWords).add("SLOT_WORDS", kSlotWords).add("RANK_WORDS", kRankWords)
      .add("REPORT_REASON_WORDS", kReportReasonWords);
  j.add("G_FLAGS", kGFlags).add("G_PRESENCE", kGPresence).add("G_POISON_COUNT", kGPoisonCount)
      .add("G_POISONED_RANK", kGPoisonedRank).add("G_WORLD", kGWorld).add("G_SLOTS", kGSlots)
      .add("G_CAPACITY", kGCapacity).add("G_DIVERGED", kGDivergedSlots).add("G_DECIDED", kGDecidedSlots)
      .add("G_POLICY", kGPolicy).add("G_FIELD_BASE", kGFieldBase).add("G_FIELD_STRIDE", kGFieldStride);
  j.add("G_FIELD_ROOT", kFRoot).add("G_FIELD_AND", kFAnd).add("G_FIELD_OR", kFOr)
      .add("G_FIELD_DIFFER_LB", kFDifferLb).add("G_FIELD_EQUAL", kFEqual);
  j.add("FLAG_SEQ_MISMATCH", kFlagSeqMismatch).add("FLAG_SITE_MISMATCH", kFlagSiteMismatch)
      .add("FLAG_POLICY_MISMATCH", kFlagPolicyMismatch).add("FLAG_SLOTS_MISMATCH", kFlagSlotsMismatch)
      .add("FLAG_WORLD_MISMATCH", kFlagWorldMismatch).add("FLAG_POISONED", kFlagPoisoned)
      .add("FLAG_CORRUPT", kFlagCorrupt).add("FLAG_EXACT", kFlagExact).add("FLAG_HEADER_OK", kFlagHeaderOk)
      .add("FLAG_SLOT_STATE", kFlagSlotState);
  j.add("S_STATUS", kSStatus).add("S_VOTES", kSVotes).add("S_ROOT_VOTE", kSRootVote)
      .add("S_ROOT_STAGE", kSRootStage).add("S_ROOT_TARGET", kSRootTarget).add("S_STAGE_AND", kSStageAnd)
      .add("S_STAGE_OR", kSStageOr).add("S_TARGET_AND", kSTargetAnd).add("S_TARGET_OR", kSTargetOr)
      .add("S_STAGE_DIFFER", kSStageDiffer).add("S_TARGET_DIFFER", kSTargetDiffer)
      .add("S_KEY_DIFFER", kSKeyDiffer).add("S_ROOT_POLICY", kSRootPolicy).add("S_POLICY_AND", kSPolicyAnd)
      .add("S_POLICY_OR", kSPolicyOr).add("S_POLICY_DIFFER", kSPolicyDiffer).add("S_ROOT_DIGEST", kSRootDigest)
      .add("S_DIGEST_AND", kSDigestAnd).add("S_DIGEST_OR", kSDigestOr).add("S_DIGEST_DIFFER", kSDigestDiffer);
  j.add("STATUS_DECIDED", kStatusDecided).add("STATUS_DIVERGED", kStatusDiverged)
      .add("STATUS_STAGE_DIFFERS", kStatusStageDiffers).add("STATUS_TARGET_DIFFERS", kStatusTargetDiffers)
      .add("STATUS_POLICY_PASSED", kStatusPolicyPassed).add("STATUS_CORRUPT", kStatusCorrupt)
      .add("STATUS_POLICY_DIFFERS", kStatusPolicyDiffers).add("STATUS_DIGEST_DIFFERS", kStatusDigestDiffers)
      .add("STATUS_NO_GATE", kStatusNoGate);
  j.add("SLOT_ENTRY_ID_MASK", kSlotEntryIdMask).add("SLOT_ENTRY_STAGE_SHIFT", kSlotEntryStageShift)
      .add("SLOT_ENTRY_VOTE_SHIFT", kSlotEntryVoteShift).add("SLOT_ENTRY_POLICY_SHIFT", kSlotEntryPolicyShift)
      .add("SLOT_ENTRY_DIGEST_SHIFT", kSlotEntryDigestShift);
  return j.str();
}

std::string wire_sizes(int64_t num_slots, int64_t world_size, bool slot_state) {
  const std::string op = "esper_gate.wire_sizes";
  check_slot_count(op, num_slots);
  check_world(op, 0, world_size);
  const auto L = wire::make_layout(wire::capacity_for(num_slots), world_size, slot_state);
  JsonObject j;
  // Keys are the fields of wire.Layout, then the report's.
  j.add("capacity", L.capacity).add("world", L.world).add("slot_state", L.slot_state ? 1 : 0)
      .add("slot_bits", L.slot_bits).add("record_bits", L.record_bits)
      .add("counter_width", L.counter_width).add("counters_per_word", L.counters_per_word)
      .add("counts_offset", L.counts_offset).add("counts_words", L.counts_words)
      .add("root_offset", L.root_offset).add("root_words", L.root_words)
      .add("lanes_offset", L.lanes_offset).add("lanes_words", L.lanes_words)
      .add("reasons_offset", L.reasons_offset).add("reasons_words", L.reasons_words)
      .add("total_words", L.total_words).add("exact", L.exact ? 1 : 0);
  j.add("report_words", wire::report_words(num_slots, world_size))
      .add("ranks_offset", wire::ranks_offset(num_slots))
      .add("slot_ranks_offset", wire::slot_ranks_offset(num_slots, world_size))
      .add("reason_counts_offset", wire::reason_counts_offset(num_slots, world_size));
  return j.str();
}

}  // namespace

// No tensor arguments, so one kernel serves every device (a call without
// tensors dispatches to the composite kernel); they need no fake.
TORCH_LIBRARY_IMPL(esper_gate, CompositeImplicitAutograd, m) {
  m.impl("wire_constants", &wire_constants);
  m.impl("wire_sizes", &wire_sizes);
}

}  // namespace esper_gate
