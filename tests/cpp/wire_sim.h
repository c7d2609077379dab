// W simulated ranks on one host, built only from the wire-format functions:
// each rank packs its buffer, the buffers are summed (what all_reduce SUM
// does) and the sum is decoded. pack_rank and decode_all run the very pack and
// decode sequences the kernels run (csrc/wire/pack.h, decode.h), so the
// torch-free tests exercise the kernels' code. Being the same code, it is no
// oracle: expectations come from hand-worked values or from oracle.h.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "wire/decode.h"
#include "wire/layout.h"
#include "wire/limits.h"
#include "wire/loops.h"
#include "wire/pack.h"
#include "wire/report.h"

namespace eg_test {

namespace wire = esper_gate::wire;

struct RankInput {
  std::vector<int64_t> votes;
  std::vector<int64_t> stages;
  std::vector<int64_t> targets;
  wire::HeaderValues header;  // reason/poison as the caller declares them
  // Per-slot policy codes and state digests; empty sends none (the header's
  // policy in every slot, digest 0), as the op does without the tensors.
  std::vector<int64_t> policies;
  std::vector<int64_t> digests;

  const int64_t* policies_or_null() const { return policies.empty() ? nullptr : policies.data(); }
  const int64_t* digests_or_null() const { return digests.empty() ? nullptr : digests.data(); }
  int64_t policy(int64_t s) const { return policies.empty() ? static_cast<int64_t>(header.policy) : policies[s]; }
  int64_t digest(int64_t s) const { return digests.empty() ? 0 : digests[s]; }
};

// Like esper_gate::make_header for in-range arguments (that one needs torch).
inline wire::HeaderValues header_values(
    uint64_t seq, uint64_t site, int64_t policy, int64_t num_slots, int64_t world,
    int64_t reason = wire::kReasonNone) {
  wire::HeaderValues h;
  h.seq = seq & wire::field_mask(wire::kFieldSeq);
  h.site = site & wire::field_mask(wire::kFieldSite);
  h.policy = static_cast<uint64_t>(policy);
  h.slots = static_cast<uint64_t>(num_slots);
  h.world = static_cast<uint64_t>(world);
  h.poison = reason != wire::kReasonNone ? 1 : 0;
  h.reason = static_cast<uint64_t>(reason);
  return h;
}

// num_slots ranks agreeing on everything: every slot votes `vote`, slot s has
// stage s % 64 and target (7 * s + 3) % 64.
inline RankInput agreeing_input(
    int64_t num_slots, int64_t world, int64_t policy, int64_t vote = 1, uint64_t seq = 41,
    uint64_t site = 0xC0FFEE) {
  RankInput in;
  for (int64_t s = 0; s < num_slots; ++s) {
    in.votes.push_back(vote);
    in.stages.push_back(s % 64);
    in.targets.push_back((7 * s + 3) % 64);
  }
  in.header = header_values(seq, site, policy, num_slots, world);
  return in;
}

// The header a rank actually sends: the first bad slot poisons it unless the
// caller already declared a reason. Tests use it to know what to expect.
inline wire::HeaderValues effective_header(const RankInput& in, std::vector<uint64_t>* records) {
  const int64_t n = static_cast<int64_t>(in.votes.size());
  records->assign(static_cast<size_t>(n), 0);
  int first_bad = wire::kNoBadSlot;
  for (int64_t s = 0; s < n; ++s) {
    int64_t reason = wire::kReasonNone;
    (*records)[s] = wire::encode_slot(in.votes[s], in.stages[s], in.targets[s], in.policy(s), in.digest(s), &reason);
    if (reason != wire::kReasonNone && first_bad == wire::kNoBadSlot) {
      first_bad = static_cast<int>(s * wire::kBadSlotStride + reason);
    }
  }
  wire::HeaderValues h = in.header;
  wire::apply_bad_slot(&h, first_bad);
  return h;
}

// Whether a call carries the slot state: some rank sends per-slot policies or
// digests. The ranks of a call agree on it (GateSync fixes it per gate), so
// the simulated ranks that send neither send the defaults, as a GateSync
// built with the slot state does.
inline bool carries_slot_state(const std::vector<RankInput>& inputs) {
  for (const RankInput& in : inputs) {
    if (!in.policies.empty() || !in.digests.empty()) return true;
  }
  return false;
}

// One rank's contribution; the layout comes from its own slot count, the
// world size and the call's slot state (not from its header, so tests can lie
// in the header).
inline std::vector<int64_t> pack_rank(const RankInput& in, int64_t rank, int64_t world, bool slot_state) {
  const int64_t n = static_cast<int64_t>(in.votes.size());
  const wire::Layout L = wire::make_layout(wire::capacity_for(n), world, slot_state);
  std::vector<uint64_t> records(static_cast<size_t>(n));
  wire::PackShared shared;
  std::vector<int64_t> out(static_cast<size_t>(L.total_words));
  wire::pack_buffer(wire::SerialLoop{}, in.votes.data(), in.stages.data(), in.targets.data(),
                    in.policies_or_null(), in.digests_or_null(), n, in.header, L, rank, records.data(), &shared,
                    out.data());
  return out;
}

// The same, carrying the slot state exactly when this rank sends policies or
// digests, as the op decides.
inline std::vector<int64_t> pack_rank(const RankInput& in, int64_t rank, int64_t world) {
  return pack_rank(in, rank, world, !in.policies.empty() || !in.digests.empty());
}

// Wrapping add, as NCCL/Gloo would (never reached by valid buffers, whose
// sign bits stay clear).
inline void add_into(std::vector<int64_t>* sum, const std::vector<int64_t>& buf) {
  if (sum->empty()) sum->assign(buf.size(), 0);
  if (sum->size() != buf.size()) {
    std::fprintf(stderr, "wire_sim: summing buffers of %zu and %zu words\n", sum->size(), buf.size());
    std::abort();
  }
  for (size_t i = 0; i < buf.size(); ++i) {
    (*sum)[i] = static_cast<int64_t>(static_cast<uint64_t>((*sum)[i]) + static_cast<uint64_t>(buf[i]));
  }
}

// inputs[r] is rank r's input; rank_ids lets a test send a rank twice or
// leave one out (default: 0..W-1).
inline std::vector<int64_t> reduce_ranks(
    const std::vector<RankInput>& inputs, int64_t world, const std::vector<int64_t>& rank_ids = {}) {
  std::vector<int64_t> sum;
  const bool slot_state = carries_slot_state(inputs);
  if (rank_ids.empty()) {
    for (int64_t r = 0; r < static_cast<int64_t>(inputs.size()); ++r) {
      add_into(&sum, pack_rank(inputs[r], r, world, slot_state));
    }
  } else {
    for (int64_t r : rank_ids) add_into(&sum, pack_rank(inputs[r], r, world, slot_state));
  }
  return sum;
}

struct Decoded {
  int64_t num_slots = 0;
  int64_t world = 0;
  bool slot_state = false;         // the layout the buffer's size picked
  bool header_ok = false;          // decode_global's verdict, before slots
  std::vector<int64_t> report;
  std::vector<uint8_t> decision;

  int64_t global(int64_t k) const { return report[k]; }
  int64_t flags() const { return report[wire::kGFlags]; }
  bool flag(int64_t f) const { return (flags() & f) != 0; }
  int64_t field(int f, int k) const {
    return report[wire::kGFieldBase + wire::kGFieldStride * f + k];
  }
  const int64_t* slot(int64_t s) const {
    return report.data() + wire::slots_offset() + wire::kSlotWords * s;
  }
  int64_t status(int64_t s) const { return slot(s)[wire::kSStatus]; }
  const int64_t* rank(int64_t r) const {
    return report.data() + wire::ranks_offset(num_slots) + wire::kRankWords * r;
  }
  // Ranks poisoned for reason `code` (1..kReasonMax), from REASON_COUNTS.
  int64_t reason_count(int64_t code) const {
    return report[wire::reason_counts_offset(num_slots, world) + code - 1];
  }
  int64_t slot_rank(int64_t s, int64_t r) const {
    return report[wire::slot_ranks_offset(num_slots, world) + s * world + r];
  }
};

// The reduced buffer must hold exactly the words of one of the two layouts
// (its size picks which, as in the op): the fuzz test runs under
// AddressSanitizer and relies on any read past them being caught.
inline Decoded decode_all(const std::vector<int64_t>& buf, int64_t num_slots, int64_t world, int64_t policy) {
  const wire::Layout core = wire::make_layout(wire::capacity_for(num_slots), world, false);
  const wire::Layout with_state = wire::make_layout(wire::capacity_for(num_slots), world, true);
  const int64_t words = static_cast<int64_t>(buf.size());
  if (words != core.total_words && words != with_state.total_words) {
    std::fprintf(stderr, "wire_sim: decode of %zu words, the layouts have %lld and %lld\n", buf.size(),
                 static_cast<long long>(core.total_words), static_cast<long long>(with_state.total_words));
    std::abort();
  }
  const wire::Layout& L = words == with_state.total_words ? with_state : core;
  Decoded d;
  d.num_slots = num_slots;
  d.world = world;
  d.slot_state = L.slot_state;
  d.report.assign(static_cast<size_t>(wire::report_words(num_slots, world)), 0);
  d.decision.assign(static_cast<size_t>(num_slots), 0);
  wire::DecodeShared shared;
  wire::decode_buffer(wire::SerialLoop{}, buf.data(), L, num_slots, policy, d.decision.data(),
                      d.report.data(), &shared);
  d.header_ok = shared.header_ok != 0;
  return d;
}

// Packs every rank, sums and decodes from rank 0's point of view.
inline Decoded simulate(const std::vector<RankInput>& inputs, int64_t policy) {
  const int64_t world = static_cast<int64_t>(inputs.size());
  return decode_all(reduce_ranks(inputs, world), static_cast<int64_t>(inputs[0].votes.size()),
                    world, policy);
}

// Deterministic on every standard library (std::uniform_int_distribution is not).
struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed) {}
  uint64_t next() {  // splitmix64
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
  int64_t word() { return static_cast<int64_t>(next()); }
};

}  // namespace eg_test
