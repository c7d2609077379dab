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
    const PackCall& call, const at::Tensor& votes, const at::Tensor& stages, const at::Tensor& targets) {
  std::vector<uint64_t> records(static_cast<size_t>(call.num_slots));
  wire::PackShared shared;
  const int64_t* st = stages.const_data_ptr<int64_t>();
  const int64_t* tg = targets.const_data_ptr<int64_t>();
  int64_t* o = call.out.mutable_data_ptr<int64_t>();
  const int64_t* pol = optional_data(call.policies);
  const int64_t* dig = optional_data(call.digests);
  if (votes.scalar_type() == at::kBool) {
    wire::pack_buffer(
        wire::SerialLoop{}, reinterpret_cast<const uint8_t*>(votes.const_data_ptr<bool>()), st, tg, pol,
        dig, call.num_slots, call.header, call.layout, call.rank, records.data(), &shared, o);
  } else {
    wire::pack_buffer(
        wire::SerialLoop{}, votes.const_data_ptr<int64_t>(), st, tg, pol, dig, call.num_slots, call.header,
        call.layout, call.rank, records.data(), &shared, o);
  }
  return call.out;
}

std::tuple<at::Tensor, at::Tensor> decode_cpu(const DecodeCall& call, const at::Tensor& reduced) {
  wire::DecodeShared shared;
  wire::decode_buffer(
      wire::SerialLoop{}, reduced.const_data_ptr<int64_t>(), call.layout, call.num_slots, call.policy,
      call.decision.mutable_data_ptr<bool>(), call.report.mutable_data_ptr<int64_t>(), &shared);
  return {call.decision, call.report};
}

TORCH_LIBRARY_IMPL(esper_gate, CPU, m) {
  m.impl("pack", &pack_op<c10::DeviceType::CPU, &pack_cpu>);
  m.impl("decode", &decode_op<c10::DeviceType::CPU, &decode_cpu>);
}

}  // namespace esper_gate
