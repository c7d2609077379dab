// Running host code on the communicator's device from any thread, and putting
// the thread's device back without creating a CUDA context anywhere else.
//
// A thread that never chose a device reads device 0 from cudaGetDevice, but
// has no context there. Putting "device 0" back with cudaSetDevice creates the
// primary context on GPU 0 (hundreds of MiB, and a process on GPU 0 that the
// user never asked for): garbage collection of a communicator or mapped words
// on such a thread was enough. c10's MaybeSetDevice sets a device only where a
// primary context already exists (c10/cuda/CUDAFunctions.cpp in torch 2.14.1:
// MaybeSetDevice -> hasPrimaryContext(device) ? SetDevice : remember it), so
// the way back goes through it.
//
// Written over an API policy so that the C++ tests run it without a GPU
// against a model of the runtime (tests/cpp/test_device_scope.cpp); the CUDA
// build instantiates it with c10::cuda's functions (csrc/nccl/nccl_comm.cpp).
#pragma once

namespace esper_gate {

// Api: get(int*) -> bool, set(int) -> bool, maybe_set(int) -> void; every call
// reports failure instead of throwing, since destructors call this late in
// the process's exit, when the CUDA runtime may already be unloading.
template <typename Api, typename F>
bool on_device_quietly(Api& api, int device, F&& f) {
  int previous = -1;
  if (!api.get(&previous)) return false;
  if (previous == device) {
    f();
    return true;
  }
  if (!api.set(device)) return false;
  f();
  api.maybe_set(previous);
  return true;
}

}  // namespace esper_gate
