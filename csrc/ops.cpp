// Schema of the esper_gate ops and the device-independent `sync`.
//
// One sync, from Python to the result:
//   GateSync.__call__                      esper_gate/gate_sync.py (inputs -> tensors, the call's
//                                          deadline handed to the watcher, esper_gate/_watcher.py)
//   -> torch.ops.esper_gate.sync           sync_impl below
//   -> pack   (this rank's buffer)         csrc/{cpu,cuda}/gate_kernels -> wire::pack_buffer (wire/pack.h)
//   -> all_reduce SUM on the named group   sync_impl below
//   -> decode (decisions + report)         csrc/{cpu,cuda}/gate_kernels -> wire::decode_buffer (wire/decode.h)
//   -> GateConsensus                       esper_gate/consensus.py, from the report parsed by esper_gate/report.py
// wire_constants() exports the C++ constants for the test that checks the
// Python mirror (esper_gate/wire.py) against them.
//
// pack and decode have one kernel per device (csrc/cpu, csrc/cuda); sync is
// written once: pack through the dispatcher (so the tensors' device picks the
// kernel), one all_reduce on the process group named by the caller, decode.
// Nothing here waits on the host for CUDA tensors: ProcessGroupNCCL runs the
// all_reduce on its own stream and work->wait() only makes the current stream
// wait for it.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/library.h>

#include "esper_gate.h"

namespace esper_gate {
namespace {

at::Tensor call_pack(
    const at::Tensor& votes, const at::Tensor& stages, const at::Tensor& targets, int64_t seq,
    int64_t site, const std::string& policy, int64_t rank, int64_t world_size, int64_t poison) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("esper_gate::pack", "")
                       .typed<at::Tensor(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                           int64_t, c10::string_view, int64_t, int64_t, int64_t)>();
  return op.call(votes, stages, targets, seq, site, policy, rank, world_size, poison);
}

std::tuple<at::Tensor, at::Tensor> call_decode(
    const at::Tensor& reduced, int64_t num_slots, int64_t world_size, const std::string& policy) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("esper_gate::decode", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, int64_t, int64_t, c10::string_view)>();
  return op.call(reduced, num_slots, world_size, policy);
}

c10::intrusive_ptr<c10d::ProcessGroup> resolve_group(const std::string& group_name) {
  try {
    return c10d::resolve_process_group(group_name);
  } catch (const std::exception& e) {
    TORCH_CHECK_VALUE(
        false, "esper_gate.sync: unknown process group name '", group_name,
        "': pass group.group_name of an initialized torch.distributed group (",
        e.what(), ")");
  }
}

std::tuple<at::Tensor, at::Tensor> sync_impl(
    const at::Tensor& votes, const at::Tensor& stages, const at::Tensor& targets, int64_t seq,
    int64_t site, c10::string_view policy_view, c10::string_view group_view, int64_t poison) {
  const std::string op = "esper_gate.sync";
  const std::string policy(policy_view);
  check_pack_inputs(op, votes, stages, targets, poison);
  parse_policy(op, policy);
  auto group = resolve_group(std::string(group_view));
  const int64_t rank = group->getRank();
  const int64_t world_size = group->getSize();
  check_world(op, rank, world_size);

  at::Tensor buffer = call_pack(votes, stages, targets, seq, site, policy, rank, world_size, poison);
  std::vector<at::Tensor> tensors{buffer};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
  auto work = group->allreduce(tensors, opts);
  work->wait();
  return call_decode(buffer, votes.numel(), world_size, policy);
}

}  // namespace

TORCH_LIBRARY(esper_gate, m) {
  m.def(
      "pack(Tensor votes, Tensor stages, Tensor targets, int seq, int site, str policy, "
      "int rank, int world_size, int poison=0) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "decode(Tensor reduced, int num_slots, int world_size, str policy) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "sync(Tensor votes, Tensor stages, Tensor targets, int seq, int site, str policy, "
      "str group_name, int poison=0) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def("wire_constants() -> str");
  m.def("wire_sizes(int num_slots, int world_size) -> str");
}

TORCH_LIBRARY_IMPL(esper_gate, CPU, m) {
  m.impl("sync", &sync_impl);
}

TORCH_LIBRARY_IMPL(esper_gate, CUDA, m) {
  m.impl("sync", &sync_impl);
}

}  // namespace esper_gate
