// CPU kernels for pack and decode: plain loops over the shared wire-format
// functions, so they compute bit for bit what the CUDA kernels compute.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../esper_gate.h"

namespace esper_gate {

namespace {

template <typename VoteT>
int64_t encode_slots_cpu(
    const VoteT* votes, const int64_t* stages, const int64_t* targets, int64_t n,
    uint32_t* records) {
  int64_t first_reason = wire::kReasonNone;
  for (int64_t s = 0; s < n; ++s) {
    int64_t reason = wire::kReasonNone;
    records[s] = wire::encode_slot(wire::vote_value(votes, s), stages[s], targets[s], &reason);
    if (first_reason == wire::kReasonNone) first_reason = reason;
  }
  return first_reason;
}

}  // namespace

at::Tensor pack_cpu(
    const at::Tensor& votes, const at::Tensor& stages, const at::Tensor& targets,
    const wire::HeaderValues& header_in, int64_t rank, int64_t world_size) {
  const int64_t n = votes.numel();
  const auto L = wire::make_layout(wire::capacity_for(n), world_size);
  std::vector<uint32_t> records(static_cast<size_t>(n));
  const int64_t* st = stages.const_data_ptr<int64_t>();
  const int64_t* tg = targets.const_data_ptr<int64_t>();
  const int64_t slot_reason = votes.scalar_type() == at::kBool
      ? encode_slots_cpu(reinterpret_cast<const uint8_t*>(votes.const_data_ptr<bool>()), st, tg, n, records.data())
      : encode_slots_cpu(votes.const_data_ptr<int64_t>(), st, tg, n, records.data());
  wire::HeaderValues header = header_in;
  if (header.reason == wire::kReasonNone && slot_reason != wire::kReasonNone) {
    header.reason = static_cast<uint64_t>(slot_reason);
    header.poison = 1;
  }
  const auto bits = wire::encode_header(header);
  at::Tensor out = at::empty({L.total_words}, votes.options().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (int64_t w = 0; w < L.total_words; ++w) {
    o[w] = wire::pack_word(L, bits, records.data(), n, rank, header.poison != 0, w);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> decode_cpu(
    const at::Tensor& reduced, int64_t num_slots, int64_t world_size, int64_t policy) {
  const auto L = wire::make_layout(wire::capacity_for(num_slots), world_size);
  const int64_t* buf = reduced.const_data_ptr<int64_t>();
  at::Tensor decision = at::empty({num_slots}, reduced.options().dtype(at::kBool));
  at::Tensor report = at::zeros({wire::report_words(num_slots, world_size)}, reduced.options());
  bool* dec = decision.mutable_data_ptr<bool>();
  int64_t* rep = report.mutable_data_ptr<int64_t>();

  const bool header_ok = wire::decode_global(buf, L, num_slots, policy, rep);
  int64_t* slot_ranks = L.exact ? rep + wire::slot_ranks_offset(num_slots, world_size) : nullptr;
  bool any_corrupt = false;
  for (int64_t s = 0; s < num_slots; ++s) {
    const int64_t status = wire::decode_slot(
        buf, L, s, policy, rep + wire::slots_offset() + wire::kSlotWords * s,
        slot_ranks ? slot_ranks + s * world_size : nullptr);
    any_corrupt |= (status & wire::kStatusCorrupt) != 0;
  }
  int64_t diverged = 0, decided = 0;
  for (int64_t s = 0; s < num_slots; ++s) {
    int64_t* status = rep + wire::slots_offset() + wire::kSlotWords * s + wire::kSStatus;
    *status = wire::finish_slot(*status, header_ok, any_corrupt);
    dec[s] = (*status & wire::kStatusDecided) != 0;
    diverged += (*status & wire::kStatusDiverged) ? 1 : 0;
    decided += dec[s] ? 1 : 0;
  }
  if (any_corrupt) rep[wire::kGFlags] = (rep[wire::kGFlags] | wire::kFlagCorrupt) & ~wire::kFlagHeaderOk;
  rep[wire::kGDivergedSlots] = diverged;
  rep[wire::kGDecidedSlots] = decided;
  if (L.exact) {
    for (int64_t r = 0; r < world_size; ++r) {
      wire::decode_rank(buf, L, r, rep + wire::ranks_offset(num_slots) + wire::kRankWords * r);
    }
  }
  return {decision, report};
}

namespace {

at::Tensor pack_cpu_op(
    const at::Tensor& votes, const at::Tensor& stages, const at::Tensor& targets, int64_t seq,
    int64_t site, c10::string_view policy, int64_t rank, int64_t world_size, int64_t poison) {
  const auto header =
      checked_pack_header(votes, stages, targets, seq, site, std::string(policy), rank, world_size, poison);
  TORCH_CHECK_VALUE(votes.is_cpu(), "esper_gate.pack: CPU kernel got votes on ", votes.device());
  return pack_cpu(votes, stages, targets, header, rank, world_size);
}

std::tuple<at::Tensor, at::Tensor> decode_cpu_op(
    const at::Tensor& reduced, int64_t num_slots, int64_t world_size, c10::string_view policy) {
  const std::string op = "esper_gate.decode";
  check_decode_inputs(op, reduced, num_slots, world_size);
  const int64_t p = parse_policy(op, std::string(policy));
  return decode_cpu(reduced, num_slots, world_size, p);
}

}  // namespace

TORCH_LIBRARY_IMPL(esper_gate, CPU, m) {
  m.impl("pack", &pack_cpu_op);
  m.impl("decode", &decode_cpu_op);
}

}  // namespace esper_gate
