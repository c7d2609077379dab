// Host-side pieces shared by the op registration and the CPU, CUDA and Meta
// kernels: the argument checks (whose messages name the offending value and
// what was expected), the output sizes from the wire layout, and pack_op /
// decode_op, which run both before a device's kernel. Meta tensors and
// FakeTensorMode reach the same checks through the Meta kernels in
// csrc/ops.cpp, so there is no second copy of them in Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceType.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/TensorOptions.h>
#include <c10/core/SymInt.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <tuple>

#include "wire/layout.h"
#include "wire/limits.h"
#include "wire/pack.h"
#include "wire/report.h"

namespace esper_gate {

inline int64_t parse_policy(const std::string& op, const std::string& policy) {
  if (policy == "unanimous") return wire::kUnanimous;
  if (policy == "rank0") return wire::kRank0;
  if (policy == "majority") return wire::kMajority;
  if (policy == "any") return wire::kAny;
  TORCH_CHECK_VALUE(
      false, op, ": unknown policy '", policy,
      "', expected one of 'unanimous', 'rank0', 'majority', 'any'");
}

inline void check_world(const std::string& op, int64_t rank, int64_t world_size) {
  TORCH_CHECK_VALUE(
      world_size >= 1 && world_size <= wire::kMaxWorld, op, ": world_size must be in 1..",
      wire::kMaxWorld, ", got ", world_size);
  TORCH_CHECK_VALUE(
      rank >= 0 && rank < world_size, op, ": rank must be in 0..", world_size - 1,
      " for world_size ", world_size, ", got ", rank);
}

// Sizes are c10::SymInt so that the Meta kernels run these checks on the
// symbolic shapes of a torch.compile trace too; a comparison there records a
// guard on the size, and on real tensors it is a plain comparison.
inline void check_slot_count(const std::string& op, const c10::SymInt& num_slots) {
  TORCH_CHECK_VALUE(
      num_slots >= 1 && num_slots <= wire::kMaxSlots, op, ": expected 1..", wire::kMaxSlots,
      " slots, got ", num_slots);
}

inline void check_1d(const std::string& op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(
      t.dim() == 1, op, ": expected ", name, " to be a 1-D tensor, got ", t.dim(), "-D (shape ",
      t.sym_sizes(), ")");
  TORCH_CHECK_VALUE(
      t.is_contiguous(), op, ": expected ", name, " to be contiguous, got strides ", t.sym_strides());
}

// The device a tensor stands for. Under FakeTensorMode the kernel that runs
// for a FakeTensor (the Meta kernel) sees it as a meta tensor, but its
// dispatch keys keep the type of the device it stands for; reading them lets
// the Meta kernel refuse mixed devices with the message a real call gets (the
// keys keep no index: a fake call names "cuda" where a real one names "cuda:0").
inline c10::Device stands_for(const at::Tensor& t) {
  const c10::DeviceType keyed = c10::dispatchKeyToDeviceType(c10::toRuntimePerBackendFunctionalityKey(
      c10::DispatchKey::Dense, t.key_set().highestBackendKey()));
  return keyed == t.device().type() ? t.device() : c10::Device(keyed);
}

// Structural checks on pack/sync inputs. Values (ids out of range, votes that
// are not 0/1, a bad site) are not errors here: they poison the buffer so
// that every rank learns about them in the same collective.
inline void check_pack_inputs(
    const std::string& op, const at::Tensor& votes, const at::Tensor& stages,
    const at::Tensor& targets, int64_t poison) {
  check_1d(op, "votes", votes);
  check_1d(op, "stages", stages);
  check_1d(op, "targets", targets);
  TORCH_CHECK_TYPE(
      votes.scalar_type() == at::kBool || votes.scalar_type() == at::kLong, op,
      ": expected votes of dtype torch.bool or torch.int64, got ", votes.scalar_type());
  TORCH_CHECK_TYPE(
      stages.scalar_type() == at::kLong, op, ": expected stages of dtype torch.int64, got ",
      stages.scalar_type());
  TORCH_CHECK_TYPE(
      targets.scalar_type() == at::kLong, op, ": expected targets of dtype torch.int64, got ",
      targets.scalar_type());
  const c10::SymInt n = votes.sym_numel();
  TORCH_CHECK_VALUE(
      stages.sym_numel() == n && targets.sym_numel() == n, op,
      ": expected votes, stages and targets of equal length, got ", n, ", ", stages.sym_numel(),
      " and ", targets.sym_numel());
  check_slot_count(op, n);
  TORCH_CHECK_VALUE(
      stands_for(stages) == stands_for(votes) && stands_for(targets) == stands_for(votes), op,
      ": expected votes, stages and targets on one device, got ", stands_for(votes), ", ",
      stands_for(stages), " and ", stands_for(targets));
  TORCH_CHECK_VALUE(
      poison >= 0 && poison <= wire::kReasonMax, op, ": poison must be a reason code in 0..",
      wire::kReasonMax, ", got ", poison);
}

// The optional per-slot policies (codes) and state digests: shaped like
// stages, on the same device. Their values poison like stages' (reasons
// kReasonPolicy, kReasonDigest) instead of raising.
inline void check_slot_extra(
    const std::string& op, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& votes) {
  if (!t.has_value()) return;
  check_1d(op, name, *t);
  TORCH_CHECK_TYPE(
      t->scalar_type() == at::kLong, op, ": expected ", name, " of dtype torch.int64, got ", t->scalar_type());
  TORCH_CHECK_VALUE(
      t->sym_numel() == votes.sym_numel(), op, ": expected ", name, " of the votes' length ", votes.sym_numel(),
      ", got ", t->sym_numel());
  TORCH_CHECK_VALUE(
      stands_for(*t) == stands_for(votes), op, ": expected ", name, " on the votes' device ", stands_for(votes),
      ", got ", stands_for(*t));
}

inline wire::HeaderValues make_header(
    int64_t seq, int64_t site, int64_t policy, int64_t num_slots, int64_t world_size,
    int64_t poison) {
  wire::HeaderValues h;
  h.seq = static_cast<uint64_t>(seq) & wire::field_mask(wire::kFieldSeq);
  h.site = static_cast<uint64_t>(site) & wire::field_mask(wire::kFieldSite);
  h.policy = static_cast<uint64_t>(policy);
  h.slots = static_cast<uint64_t>(num_slots);
  h.world = static_cast<uint64_t>(world_size);
  // A caller-declared reason wins; the kernel fills in its own otherwise.
  int64_t reason = poison;
  if (reason == wire::kReasonNone &&
      (site < 0 || static_cast<uint64_t>(site) > wire::field_mask(wire::kFieldSite))) {
    reason = wire::kReasonSite;
  }
  h.poison = reason != wire::kReasonNone ? 1 : 0;
  h.reason = static_cast<uint64_t>(reason);
  return h;
}

// The slot capacity (wire::capacity_for) of a slot count that may be symbolic:
// the loop guards only on the capacity bucket, not on the exact count.
inline int64_t capacity_for(const c10::SymInt& num_slots) {
  int64_t c = 1;
  while (num_slots > c) c <<= 1;
  return c;
}

// The slot count a kernel works with. It is symbolic only in a trace, where
// only the Meta kernel runs, which reads neither the header nor this.
inline int64_t slot_count(const at::Tensor& votes) {
  return votes.sym_numel().maybe_as_int().value_or(0);
}

// Every structural check of pack's arguments, then this rank's header.
inline wire::HeaderValues checked_pack_header(
    const at::Tensor& votes, const at::Tensor& stages, const at::Tensor& targets, int64_t seq,
    int64_t site, const std::string& policy, int64_t rank, int64_t world_size, int64_t poison) {
  const std::string op = "esper_gate.pack";
  check_pack_inputs(op, votes, stages, targets, poison);
  const int64_t p = parse_policy(op, policy);
  check_world(op, rank, world_size);
  return make_header(seq, site, p, slot_count(votes), world_size, poison);
}

// Every check of decode's arguments, then the layout of the reduced buffer:
// the one of the two layouts of (capacity, world), without and with the slot
// state, whose size it has. Both are computed here from local values; the
// size picks one and never sizes anything, and the two always differ
// (wire::slot_state_adds_counter_words). Every rank's own pack sized its
// buffer, so inside sync the size is this rank's layout.
inline wire::Layout decode_layout(
    const std::string& op, const at::Tensor& reduced, int64_t num_slots, int64_t world_size) {
  check_slot_count(op, num_slots);
  check_world(op, 0, world_size);
  check_1d(op, "reduced", reduced);
  TORCH_CHECK_TYPE(
      reduced.scalar_type() == at::kLong, op, ": expected reduced of dtype torch.int64, got ",
      reduced.scalar_type());
  const int64_t capacity = wire::capacity_for(num_slots);
  const auto core = wire::make_layout(capacity, world_size, false);
  const auto with_state = wire::make_layout(capacity, world_size, true);
  const c10::SymInt words = reduced.sym_numel();
  TORCH_CHECK_VALUE(
      words == core.total_words || words == with_state.total_words, op, ": expected a reduced buffer of ",
      core.total_words, " words (no per-slot policies or digests) or ", with_state.total_words,
      " words (with them) for ", num_slots, " slots and world_size ", world_size, ", got ", words);
  return words == with_state.total_words ? with_state : core;
}

// What a pack kernel needs once its arguments passed: the header, the layout
// and the buffer to fill, allocated here so that every device (Meta included)
// returns the size the layout gives. The layout carries the slot state
// exactly when the call passes policies or digests; the ranks of one call
// must agree on that as on the capacity (GateSync fixes it per gate).
struct PackCall {
  wire::HeaderValues header;
  wire::Layout layout;
  int64_t num_slots;
  int64_t rank;
  at::Tensor out;  // layout.total_words int64 words, uninitialized
  at::Tensor policies;  // per-slot policy codes, or undefined: every slot has the header's policy
  at::Tensor digests;   // per-slot state digests, or undefined: every digest is 0
};

inline PackCall pack_call(
    const wire::HeaderValues& header, const c10::SymInt& num_slots, int64_t rank, int64_t world_size,
    const at::TensorOptions& options, const std::optional<at::Tensor>& policies,
    const std::optional<at::Tensor>& digests) {
  const bool slot_state = policies.has_value() || digests.has_value();
  const auto L = wire::make_layout(capacity_for(num_slots), world_size, slot_state);
  return {header, L, num_slots.maybe_as_int().value_or(0), rank,
          at::empty({L.total_words}, options.dtype(at::kLong)),
          policies.has_value() ? *policies : at::Tensor(), digests.has_value() ? *digests : at::Tensor()};
}

// A kernel's pointer to the optional per-slot values (null when absent).
inline const int64_t* optional_data(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<int64_t>() : nullptr;
}

// What a decode kernel needs: the layout, the policy code and the outputs.
struct DecodeCall {
  wire::Layout layout;
  int64_t num_slots;
  int64_t policy;
  at::Tensor decision;  // num_slots bools, uninitialized
  at::Tensor report;    // report_words int64 words, uninitialized: decode writes every word
};

inline DecodeCall decode_call(
    const wire::Layout& layout, int64_t num_slots, int64_t world_size, int64_t policy,
    const at::TensorOptions& options) {
  return {layout, num_slots, policy,
          at::empty({num_slots}, options.dtype(at::kBool)),
          at::empty({wire::report_words(num_slots, world_size)}, options.dtype(at::kLong))};
}

// The device part of each op: fill the outputs of a checked call.
using PackKernel = at::Tensor (*)(
    const PackCall&, const at::Tensor& votes, const at::Tensor& stages, const at::Tensor& targets);
using DecodeKernel = std::tuple<at::Tensor, at::Tensor> (*)(const DecodeCall&, const at::Tensor& reduced);

// The registered pack and decode of one device: the checks every device runs,
// then that device's kernel. A device file registers pack_op<its type, its
// kernel>, so the checks and sizes are written once, here.
template <c10::DeviceType kDevice, PackKernel kKernel>
at::Tensor pack_op(
    const at::Tensor& votes, const at::Tensor& stages, const at::Tensor& targets, int64_t seq,
    int64_t site, c10::string_view policy, int64_t rank, int64_t world_size, int64_t poison,
    const std::optional<at::Tensor>& policies, const std::optional<at::Tensor>& digests) {
  const auto header = checked_pack_header(
      votes, stages, targets, seq, site, std::string(policy), rank, world_size, poison);
  check_slot_extra("esper_gate.pack", "policies", policies, votes);
  check_slot_extra("esper_gate.pack", "digests", digests, votes);
  TORCH_CHECK_VALUE(
      votes.device().type() == kDevice, "esper_gate.pack: ", kDevice, " kernel got votes on ",
      votes.device());
  return kKernel(pack_call(header, votes.sym_numel(), rank, world_size, votes.options(), policies, digests),
                 votes, stages, targets);
}

template <c10::DeviceType kDevice, DecodeKernel kKernel>
std::tuple<at::Tensor, at::Tensor> decode_op(
    const at::Tensor& reduced, int64_t num_slots, int64_t world_size, c10::string_view policy) {
  const std::string op = "esper_gate.decode";
  const wire::Layout layout = decode_layout(op, reduced, num_slots, world_size);
  const int64_t p = parse_policy(op, std::string(policy));
  TORCH_CHECK_VALUE(
      reduced.device().type() == kDevice, op, ": ", kDevice, " kernel got reduced on ", reduced.device());
  return kKernel(decode_call(layout, num_slots, world_size, p, reduced.options()), reduced);
}

// CPU kernels (csrc/cpu/gate_kernels.cpp); the C++ tests call them directly.
at::Tensor pack_cpu(
    const PackCall& call, const at::Tensor& votes, const at::Tensor& stages, const at::Tensor& targets);
std::tuple<at::Tensor, at::Tensor> decode_cpu(const DecodeCall& call, const at::Tensor& reduced);

}  // namespace esper_gate
