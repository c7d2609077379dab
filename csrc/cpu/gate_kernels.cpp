// CPU kernels for pack and decode: the shared sequences of csrc/wire (pack.h,
// decode.h) run serially, so they compute bit for bit what the CUDA kernels
// compute.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../esper_gate.h"
#include "../wire/decode.h"
#include "../wire/loops.h"
#include "../wire/pack.h"

namespace esper_gate {

at::Tensor pack_cpu(
    const at::Tensor& votes, const at::Tensor& stages, const at::Tensor& targets,
    const wire::HeaderValues& header, int64_t rank, int64_t world_size) {
  const int64_t n = votes.numel();
  const auto L = wire::make_layout(wire::capacity_for(n), world_size);
  std::vector<uint32_t> records(static_cast<size_t>(n));
  wire::PackShared shared;
  at::Tensor out = at::empty({L.total_words}, votes.options().dtype(at::kLong));
  const int64_t* st = stages.const_data_ptr<int64_t>();
  const int64_t* tg = targets.const_data_ptr<int64_t>();
  int64_t* o = out.mutable_data_ptr<int64_t>();
  if (votes.scalar_type() == at::kBool) {
    wire::pack_buffer(
        wire::SerialLoop{}, reinterpret_cast<const uint8_t*>(votes.const_data_ptr<bool>()), st, tg, n,
        header, L, rank, records.data(), &shared, o);
  } else {
    wire::pack_buffer(
        wire::SerialLoop{}, votes.const_data_ptr<int64_t>(), st, tg, n, header, L, rank, records.data(),
        &shared, o);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> decode_cpu(
    const at::Tensor& reduced, int64_t num_slots, int64_t world_size, int64_t policy) {
  const auto L = wire::make_layout(wire::capacity_for(num_slots), world_size);
  at::Tensor decision = at::empty({num_slots}, reduced.options().dtype(at::kBool));
  at::Tensor report = at::zeros({wire::report_words(num_slots, world_size)}, reduced.options());
  wire::DecodeShared shared;
  wire::decode_buffer(
      wire::SerialLoop{}, reduced.const_data_ptr<int64_t>(), L, num_slots, policy,
      decision.mutable_data_ptr<bool>(), report.mutable_data_ptr<int64_t>(), &shared);
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
