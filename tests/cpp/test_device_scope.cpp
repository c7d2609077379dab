// on_device_quietly (csrc/nccl/device_scope.h) against a model of the CUDA
// runtime's device state: which devices have a primary context, and which
// device each thread has current. The model follows the runtime: a thread
// that never chose a device reads 0; setting a device creates its primary
// context; c10's MaybeSetDevice sets a device only where a context exists.
#include <set>

#include "check.h"
#include "nccl/device_scope.h"

namespace {

struct RuntimeModel {
  std::set<int> contexts;  // devices with a primary context
  int current = 0;         // what cudaGetDevice reads on this thread
  bool chosen = false;     // this thread set a device
  int sets = 0;

  bool get(int* d) {
    *d = current;
    return true;
  }
  bool set(int d) {
    current = d;
    chosen = true;
    contexts.insert(d);  // cudaSetDevice makes the context current, creating it
    ++sets;
    return true;
  }
  void maybe_set(int d) {
    if (contexts.count(d)) set(d);
    else current = d;  // remembered for the next real set, as c10 does
  }
};

// The old way back: cudaSetDevice(previous), whatever previous was.
struct RawRestore : RuntimeModel {
  void maybe_set(int d) { set(d); }
};

}  // namespace

TEST_CASE(a_thread_that_never_chose_a_device_gets_no_context_on_gpu_0) {
  RuntimeModel rt;
  rt.contexts = {1};  // the gate's GPU is 1; nothing ever ran on 0
  bool ran = false;
  EXPECT(esper_gate::on_device_quietly(rt, 1, [&] { ran = true; }));
  EXPECT(ran);
  EXPECT_EQ(rt.contexts.count(0), size_t(0));
  EXPECT_EQ(rt.current, 0);  // the thread still reads what it read before
}

TEST_CASE(the_old_restore_made_that_context) {
  // The model is what makes the test above meaningful: restoring with a raw
  // set creates the context the fix avoids.
  RawRestore rt;
  rt.contexts = {1};
  esper_gate::on_device_quietly(rt, 1, [] {});
  EXPECT_EQ(rt.contexts.count(0), size_t(1));
}

TEST_CASE(a_thread_on_another_device_with_a_context_gets_it_back) {
  RuntimeModel rt;
  rt.contexts = {0, 1};
  rt.set(0);
  int seen = -1;
  esper_gate::on_device_quietly(rt, 1, [&] { seen = rt.current; });
  EXPECT_EQ(seen, 1);
  EXPECT_EQ(rt.current, 0);
}

TEST_CASE(already_on_the_device_nothing_is_set) {
  RuntimeModel rt;
  rt.contexts = {1};
  rt.set(1);
  int before = rt.sets;
  esper_gate::on_device_quietly(rt, 1, [] {});
  EXPECT_EQ(rt.sets, before);
}

TEST_CASE(a_runtime_that_fails_runs_nothing) {
  struct Broken : RuntimeModel {
    bool set(int) { return false; }
  } rt;
  bool ran = false;
  EXPECT(!esper_gate::on_device_quietly(rt, 1, [&] { ran = true; }));
  EXPECT(!ran);
}

int main(int argc, char** argv) { return eg_test::run_all(argc, argv); }
