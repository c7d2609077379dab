// CUDA kernels for pack and decode: the shared sequences of csrc/wire (pack.h,
// decode.h), spread over the threads of one block. Each is one launch on the
// current stream: the work is at most a few thousand words, so a single block
// keeps the slot-wide steps (first bad input, "any slot corrupt", counts) in
// shared memory with no second launch and no host round trip.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../esper_gate.h"
#include "../wire/decode.h"
#include "../wire/pack.h"

namespace esper_gate {
namespace {

constexpr int kThreads = 256;

// The loop policy of csrc/wire/loops.h for one block: threads stride over the
// items and the shared state lives in shared memory, updated with atomics.
struct BlockLoop {
  template <typename F>
  __device__ __forceinline__ void for_each(int64_t n, F&& f) const {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) f(i);
  }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  __device__ __forceinline__ bool leader() const { return threadIdx.x == 0; }
  __device__ __forceinline__ void min_into(int* p, int v) const { atomicMin(p, v); }
  __device__ __forceinline__ void add_into(int* p, int v) const { atomicAdd(p, v); }
};

template <typename VoteT>
__global__ void pack_kernel(
    const VoteT* __restrict__ votes, const int64_t* __restrict__ stages,
    const int64_t* __restrict__ targets, const int64_t* policies, const int64_t* digests, int64_t num_slots,
    wire::HeaderValues header, wire::Layout L, int64_t rank, int64_t* __restrict__ out) {
  __shared__ uint64_t records[wire::kMaxSlots];
  __shared__ wire::PackShared shared;
  wire::pack_buffer(
      BlockLoop{}, votes, stages, targets, policies, digests, num_slots, header, L, rank, records, &shared, out);
}

__global__ void decode_kernel(
    const int64_t* __restrict__ buf, wire::Layout L, int64_t num_slots, int64_t policy,
    bool* __restrict__ decision, int64_t* __restrict__ rep) {
  __shared__ wire::DecodeShared shared;
  wire::decode_buffer(BlockLoop{}, buf, L, num_slots, policy, decision, rep, &shared);
}

at::Tensor pack_cuda(
    const PackCall& call, const at::Tensor& votes, const at::Tensor& stages, const at::Tensor& targets) {
  const c10::cuda::CUDAGuard guard(votes.device());
  // seq and site are kernel arguments: a captured pack would put the call
  // number of the capture into every replay, and the peers would see one
  // call repeated (a stale call number, or a divergence that is not one).
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              "esper_gate.pack: refused while the current CUDA stream is capturing a CUDA graph: the call "
              "number (seq) is a kernel argument, so every replay of the graph would resend the call number "
              "of the capture. Call the gate (esper_gate.sync / GateSync) outside the captured region, "
              "e.g. before torch.cuda.graph or between two graphs.");
  auto stream = c10::cuda::getCurrentCUDAStream();
  int64_t* out = call.out.mutable_data_ptr<int64_t>();
  if (votes.scalar_type() == at::kBool) {
    pack_kernel<uint8_t><<<1, kThreads, 0, stream>>>(
        reinterpret_cast<const uint8_t*>(votes.const_data_ptr<bool>()), stages.const_data_ptr<int64_t>(),
        targets.const_data_ptr<int64_t>(), optional_data(call.policies), optional_data(call.digests),
        call.num_slots, call.header, call.layout, call.rank, out);
  } else {
    pack_kernel<int64_t><<<1, kThreads, 0, stream>>>(
        votes.const_data_ptr<int64_t>(), stages.const_data_ptr<int64_t>(),
        targets.const_data_ptr<int64_t>(), optional_data(call.policies), optional_data(call.digests),
        call.num_slots, call.header, call.layout, call.rank, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return call.out;
}

std::tuple<at::Tensor, at::Tensor> decode_cuda(const DecodeCall& call, const at::Tensor& reduced) {
  const c10::cuda::CUDAGuard guard(reduced.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  decode_kernel<<<1, kThreads, 0, stream>>>(
      reduced.const_data_ptr<int64_t>(), call.layout, call.num_slots, call.policy,
      call.decision.mutable_data_ptr<bool>(), call.report.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {call.decision, call.report};
}

}  // namespace

TORCH_LIBRARY_IMPL(esper_gate, CUDA, m) {
  m.impl("pack", &pack_op<c10::DeviceType::CUDA, &pack_cuda>);
  m.impl("decode", &decode_op<c10::DeviceType::CUDA, &decode_cuda>);
}

}  // namespace esper_gate
