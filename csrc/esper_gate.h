// Host-side pieces shared by the op registration and the CPU/CUDA kernels:
// argument checks (whose messages name the offending value and what was
// expected) and the kernel entry points.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <tuple>

#include "wire/layout.h"
#include "wire/limits.h"
#include "wire/pack.h"

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

inline void check_slot_count(const std::string& op, int64_t num_slots) {
  TORCH_CHECK_VALUE(
      num_slots >= 1 && num_slots <= wire::kMaxSlots, op, ": expected 1..", wire::kMaxSlots,
      " slots, got ", num_slots);
}

inline void check_1d(const std::string& op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(
      t.dim() == 1, op, ": expected ", name, " to be a 1-D tensor, got ", t.dim(), "-D (shape ",
      t.sizes(), ")");
  TORCH_CHECK_VALUE(
      t.is_contiguous(), op, ": expected ", name, " to be contiguous, got strides ", t.strides());
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
  const int64_t n = votes.numel();
  TORCH_CHECK_VALUE(
      stages.numel() == n && targets.numel() == n, op,
      ": expected votes, stages and targets of equal length, got ", n, ", ", stages.numel(),
      " and ", targets.numel());
  check_slot_count(op, n);
  TORCH_CHECK_VALUE(
      stages.device() == votes.device() && targets.device() == votes.device(), op,
      ": expected votes, stages and targets on one device, got ", votes.device(), ", ",
      stages.device(), " and ", targets.device());
  TORCH_CHECK_VALUE(
      poison >= 0 && poison <= wire::kReasonMax, op, ": poison must be a reason code in 0..",
      wire::kReasonMax, ", got ", poison);
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

// Every structural check of pack's arguments, then this rank's header.
inline wire::HeaderValues checked_pack_header(
    const at::Tensor& votes, const at::Tensor& stages, const at::Tensor& targets, int64_t seq,
    int64_t site, const std::string& policy, int64_t rank, int64_t world_size, int64_t poison) {
  const std::string op = "esper_gate.pack";
  check_pack_inputs(op, votes, stages, targets, poison);
  const int64_t p = parse_policy(op, policy);
  check_world(op, rank, world_size);
  return make_header(seq, site, p, votes.numel(), world_size, poison);
}

inline void check_decode_inputs(
    const std::string& op, const at::Tensor& reduced, int64_t num_slots, int64_t world_size) {
  check_slot_count(op, num_slots);
  check_world(op, 0, world_size);
  check_1d(op, "reduced", reduced);
  TORCH_CHECK_TYPE(
      reduced.scalar_type() == at::kLong, op, ": expected reduced of dtype torch.int64, got ",
      reduced.scalar_type());
  const auto L = wire::make_layout(wire::capacity_for(num_slots), world_size);
  TORCH_CHECK_VALUE(
      reduced.numel() == L.total_words, op, ": expected a reduced buffer of ", L.total_words,
      " words for ", num_slots, " slots and world_size ", world_size, ", got ", reduced.numel());
}

// Kernel entry points (inputs already checked).
at::Tensor pack_cpu(
    const at::Tensor& votes, const at::Tensor& stages, const at::Tensor& targets,
    const wire::HeaderValues& header, int64_t rank, int64_t world_size);
std::tuple<at::Tensor, at::Tensor> decode_cpu(
    const at::Tensor& reduced, int64_t num_slots, int64_t world_size, int64_t policy);

}  // namespace esper_gate
