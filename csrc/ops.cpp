// Schema of the esper_gate ops, their Meta kernels and the device-independent
// `sync`.
//
// One sync, from Python to the result:
//   GateSync.__call__                      esper_gate/gate_sync.py (inputs -> tensors, the call's
//                                          deadline handed to the watcher, esper_gate/_watcher.py)
//   -> torch.ops.esper_gate.sync           sync_impl below
//   -> pack   (this rank's buffer)         csrc/{cpu,cuda}/gate_kernels -> wire::pack_buffer (wire/pack.h)
//   -> all_reduce SUM on the named group   sync_impl below
//   -> decode (decisions + report)         csrc/{cpu,cuda}/gate_kernels -> wire::decode_buffer (wire/decode.h)
//   -> GateConsensus                       esper_gate/consensus.py, from the report parsed by esper_gate/report.py
// wire_constants() and wire_sizes() (csrc/wire_constants.cpp) give Python the
// constants and the per-call sizes, so esper_gate/wire.py computes no layout.
//
// pack and decode have one kernel per device (csrc/cpu, csrc/cuda, and Meta
// here), each behind the same checks and output sizes (pack_op / decode_op in
// esper_gate.h). sync is written once and registered once: pack through the
// dispatcher (so the tensors' device picks the kernel, and pack's checks run
// once), one all_reduce on the process group named by the caller, decode.
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
    int64_t site, const std::string& policy, int64_t rank, int64_t world_size, int64_t poison,
    const std::optional<at::Tensor>& policies, const std::optional<at::Tensor>& digests) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("esper_gate::pack", "")
                       .typed<at::Tensor(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                           int64_t, c10::string_view, int64_t, int64_t, int64_t,
                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  return op.call(votes, stages, targets, seq, site, policy, rank, world_size, poison, policies, digests);
}

std::tuple<at::Tensor, at::Tensor> call_decode(
    const at::Tensor& reduced, int64_t num_slots, int64_t world_size, const std::string& policy) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("esper_gate::decode", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, int64_t, int64_t, c10::string_view)>();
  return op.call(reduced, num_slots, world_size, policy);
}

// sync's argument checks are pack's, run once by the pack kernel that sync
// calls; an error from them names the op the caller called. The fake kernel
// of sync (esper_gate/ops.py) renames the same way.
std::string as_sync_message(const std::string& msg) {
  static const std::string pack = "esper_gate.pack:";
  if (msg.compare(0, pack.size(), pack) != 0) return msg;
  return "esper_gate.sync:" + msg.substr(pack.size());
}

at::Tensor pack_for_sync(
    const at::Tensor& votes, const at::Tensor& stages, const at::Tensor& targets, int64_t seq,
    int64_t site, const std::string& policy, int64_t rank, int64_t world_size, int64_t poison,
    const std::optional<at::Tensor>& policies, const std::optional<at::Tensor>& digests) {
  try {
    return call_pack(votes, stages, targets, seq, site, policy, rank, world_size, poison, policies, digests);
  } catch (const c10::TypeError& e) {
    TORCH_CHECK_TYPE(false, as_sync_message(e.msg()));
  } catch (const c10::ValueError& e) {
    TORCH_CHECK_VALUE(false, as_sync_message(e.msg()));
  }
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
    int64_t site, c10::string_view policy_view, c10::string_view group_view, int64_t poison,
    const std::optional<at::Tensor>& policies, const std::optional<at::Tensor>& digests) {
  const std::string policy(policy_view);
  auto group = resolve_group(std::string(group_view));
  const int64_t world_size = group->getSize();
  at::Tensor buffer =
      pack_for_sync(votes, stages, targets, seq, site, policy, group->getRank(), world_size, poison, policies,
                    digests);
  std::vector<at::Tensor> tensors{buffer};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
  auto work = group->allreduce(tensors, opts);
  work->wait();
  return call_decode(buffer, votes.numel(), world_size, policy);
}

// Meta kernels: what FakeTensorMode, torch.compile and calls with meta
// tensors run. They are pack_op/decode_op like every device's, so they refuse
// what the CPU and CUDA kernels refuse, with the same messages, and return
// outputs sized by the same layout; only the kernel launch is left out.
at::Tensor pack_meta(
    const PackCall& call, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  return call.out;
}

std::tuple<at::Tensor, at::Tensor> decode_meta(const DecodeCall& call, const at::Tensor&) {
  return {call.decision, call.report};
}

}  // namespace

TORCH_LIBRARY(esper_gate, m) {
  // sync's fake kernel needs the process group's world size, so it is written
  // in Python; a FakeTensorMode call before that module is imported is told
  // to import it.
  m.set_python_module("esper_gate.ops");
  m.def(
      "pack(Tensor votes, Tensor stages, Tensor targets, int seq, int site, str policy, "
      "int rank, int world_size, int poison=0, Tensor? policies=None, Tensor? digests=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "decode(Tensor reduced, int num_slots, int world_size, str policy) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "sync(Tensor votes, Tensor stages, Tensor targets, int seq, int site, str policy, "
      "str group_name, int poison=0, Tensor? policies=None, Tensor? digests=None) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def("wire_constants() -> str");
  m.def("wire_sizes(int num_slots, int world_size, bool slot_state=False) -> str");
}

TORCH_LIBRARY_IMPL(esper_gate, Meta, m) {
  m.impl("pack", &pack_op<c10::DeviceType::Meta, &pack_meta>);
  m.impl("decode", &decode_op<c10::DeviceType::Meta, &decode_meta>);
}

// One kernel for every device: pack and decode through the dispatcher pick
// the device. CompositeExplicitAutograd rather than CompositeImplicitAutograd,
// because sync has a fake kernel of its own (register_fake refuses an op with
// a CompositeImplicitAutograd kernel) and must not be decomposed in a trace:
// its collective is one node of the graph.
TORCH_LIBRARY_IMPL(esper_gate, CompositeExplicitAutograd, m) {
  m.impl("sync", &sync_impl);
}

}  // namespace esper_gate
