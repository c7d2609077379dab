// CUDA kernels for pack and decode. Each is one launch of one block on the
// current stream: the work is at most a few thousand words, so a single block
// keeps the slot-wide steps (first bad input, "any slot corrupt", counts) in
// shared memory with no second launch and no host round trip.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>

#include "../esper_gate.h"

namespace esper_gate {
namespace {

constexpr int kThreads = 256;

template <typename VoteT>
__global__ void pack_kernel(
    const VoteT* __restrict__ votes, const int64_t* __restrict__ stages,
    const int64_t* __restrict__ targets, int64_t num_slots, wire::HeaderValues header,
    wire::Layout L, int64_t rank, int64_t* __restrict__ out) {
  __shared__ uint32_t records[wire::kMaxSlots];
  __shared__ int first_bad;  // slot * 32 + reason of the lowest bad slot
  __shared__ wire::HeaderBits bits;
  __shared__ bool poisoned;
  if (threadIdx.x == 0) first_bad = INT_MAX;
  __syncthreads();
  for (int64_t s = threadIdx.x; s < num_slots; s += blockDim.x) {
    int64_t reason = wire::kReasonNone;
    records[s] = wire::encode_slot(wire::vote_value(votes, s), stages[s], targets[s], &reason);
    if (reason != wire::kReasonNone) atomicMin(&first_bad, static_cast<int>(s * 32 + reason));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (header.reason == wire::kReasonNone && first_bad != INT_MAX) {
      header.reason = static_cast<uint64_t>(first_bad % 32);
      header.poison = 1;
    }
    bits = wire::encode_header(header);
    poisoned = header.poison != 0;
  }
  __syncthreads();
  for (int64_t w = threadIdx.x; w < L.total_words; w += blockDim.x) {
    out[w] = wire::pack_word(L, bits, records, num_slots, rank, poisoned, w);
  }
}

__global__ void decode_kernel(
    const int64_t* __restrict__ buf, wire::Layout L, int64_t num_slots, int64_t policy,
    bool* __restrict__ decision, int64_t* __restrict__ rep) {
  __shared__ bool header_ok;
  __shared__ int any_corrupt;
  __shared__ int diverged;
  __shared__ int decided;
  const int64_t world = L.world;
  if (threadIdx.x == 0) {
    header_ok = wire::decode_global(buf, L, num_slots, policy, rep);
    any_corrupt = 0;
    diverged = 0;
    decided = 0;
  }
  __syncthreads();
  int64_t* slot_ranks = L.exact ? rep + wire::slot_ranks_offset(num_slots, world) : nullptr;
  for (int64_t s = threadIdx.x; s < num_slots; s += blockDim.x) {
    const int64_t status = wire::decode_slot(
        buf, L, s, policy, rep + wire::slots_offset() + wire::kSlotWords * s,
        slot_ranks ? slot_ranks + s * world : nullptr);
    if (status & wire::kStatusCorrupt) atomicOr(&any_corrupt, 1);
  }
  if (L.exact) {
    for (int64_t r = threadIdx.x; r < world; r += blockDim.x) {
      wire::decode_rank(buf, L, r, rep + wire::ranks_offset(num_slots) + wire::kRankWords * r);
    }
  }
  __syncthreads();
  for (int64_t s = threadIdx.x; s < num_slots; s += blockDim.x) {
    int64_t* status = rep + wire::slots_offset() + wire::kSlotWords * s + wire::kSStatus;
    *status = wire::finish_slot(*status, header_ok, any_corrupt != 0);
    const bool d = (*status & wire::kStatusDecided) != 0;
    decision[s] = d;
    if (*status & wire::kStatusDiverged) atomicAdd(&diverged, 1);
    if (d) atomicAdd(&decided, 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (any_corrupt) {
      rep[wire::kGFlags] = (rep[wire::kGFlags] | wire::kFlagCorrupt) & ~wire::kFlagHeaderOk;
    }
    rep[wire::kGDivergedSlots] = diverged;
    rep[wire::kGDecidedSlots] = decided;
  }
}

at::Tensor pack_cuda_op(
    const at::Tensor& votes, const at::Tensor& stages, const at::Tensor& targets, int64_t seq,
    int64_t site, c10::string_view policy, int64_t rank, int64_t world_size, int64_t poison) {
  const auto header =
      checked_pack_header(votes, stages, targets, seq, site, std::string(policy), rank, world_size, poison);
  TORCH_CHECK_VALUE(votes.is_cuda(), "esper_gate.pack: CUDA kernel got votes on ", votes.device());
  const c10::cuda::CUDAGuard guard(votes.device());
  const int64_t n = votes.numel();
  const auto L = wire::make_layout(wire::capacity_for(n), world_size);
  at::Tensor out = at::empty({L.total_words}, votes.options().dtype(at::kLong));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (votes.scalar_type() == at::kBool) {
    pack_kernel<uint8_t><<<1, kThreads, 0, stream>>>(
        reinterpret_cast<const uint8_t*>(votes.const_data_ptr<bool>()), stages.const_data_ptr<int64_t>(),
        targets.const_data_ptr<int64_t>(), n, header, L, rank, out.mutable_data_ptr<int64_t>());
  } else {
    pack_kernel<int64_t><<<1, kThreads, 0, stream>>>(
        votes.const_data_ptr<int64_t>(), stages.const_data_ptr<int64_t>(),
        targets.const_data_ptr<int64_t>(), n, header, L, rank, out.mutable_data_ptr<int64_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> decode_cuda_op(
    const at::Tensor& reduced, int64_t num_slots, int64_t world_size, c10::string_view policy) {
  const std::string op = "esper_gate.decode";
  check_decode_inputs(op, reduced, num_slots, world_size);
  const int64_t p = parse_policy(op, std::string(policy));
  TORCH_CHECK_VALUE(reduced.is_cuda(), op, ": CUDA kernel got reduced on ", reduced.device());
  const c10::cuda::CUDAGuard guard(reduced.device());
  const auto L = wire::make_layout(wire::capacity_for(num_slots), world_size);
  at::Tensor decision = at::empty({num_slots}, reduced.options().dtype(at::kBool));
  at::Tensor report = at::empty({wire::report_words(num_slots, world_size)}, reduced.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  decode_kernel<<<1, kThreads, 0, stream>>>(
      reduced.const_data_ptr<int64_t>(), L, num_slots, p, decision.mutable_data_ptr<bool>(),
      report.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {decision, report};
}

}  // namespace

TORCH_LIBRARY_IMPL(esper_gate, CUDA, m) {
  m.impl("pack", &pack_cuda_op);
  m.impl("decode", &decode_cuda_op);
}

}  // namespace esper_gate
