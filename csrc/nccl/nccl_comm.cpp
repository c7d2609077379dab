// The gate's own NCCL communicator: the libnccl.so.2 that torch already
// loaded, reached through dlsym, never linked; a non-blocking init; one
// all_reduce (SUM, int64) on a gate stream ordered against the caller's
// stream by events; abort from any thread; host-mapped words that the failure
// path writes without any CUDA call.
//
// Compiled only in the CUDA build (setup.py adds csrc/nccl when it finds the
// nccl.h shipped with torch's nvidia-nccl wheel). Written against NCCL 2.30.7
// (nvidia/nccl/include/nccl.h of the nvidia-nccl-cu13 wheel that torch 2.14.1
// depends on); the functions and the words quoted below are that header's.
//
// Ops (torch.ops.esper_gate.*; Python face: esper_gate/_nccl.py). A
// communicator is a plain int handle, so no custom class crosses the
// dispatcher:
//   nccl_library_info() -> str            JSON: the loaded library, its version, the header's
//   nccl_unique_id() -> Tensor            ncclGetUniqueId, 128 uint8 on the CPU
//   nccl_config_probe() -> str            JSON: the ncclConfig_t that init passes
//   nccl_comm_init(Tensor id, int rank, int world, int device) -> int
//   nccl_comm_state(int comm) -> str      "pending" | "ready" | "error: ..." | "aborted" | "destroyed"
//   nccl_all_reduce_start_(Tensor(a!) buf, int comm) -> int   0: enqueued; 1: NCCL still enqueues it
//   nccl_all_reduce_poll(Tensor(a!) buf, int comm) -> int     the same, one look later
//   nccl_comm_abort / nccl_comm_finalize / nccl_comm_destroy / nccl_comm_release (int comm) -> ()
//   nccl_mapped_words(int n, int device) -> (Tensor host, Tensor device)
#include <dlfcn.h>
#include <link.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <torch/library.h>

#include "device_scope.h"

namespace esper_gate {
namespace {

// ---- JSON out (flat objects of strings, ints and string lists) -------------

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

struct JsonObject {
  std::ostringstream os;
  bool first = true;
  JsonObject& key(const char* k) {
    os << (first ? "{" : ", ") << quote(k) << ": ";
    first = false;
    return *this;
  }
  JsonObject& str(const char* k, const std::string& v) { key(k).os << quote(v); return *this; }
  JsonObject& num(const char* k, long long v) { key(k).os << v; return *this; }
  JsonObject& list(const char* k, const std::vector<std::string>& v) {
    key(k).os << "[";
    for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << quote(v[i]);
    os << "]";
    return *this;
  }
  std::string done() { return first ? "{}" : os.str() + "}"; }
};

// ---- the loaded library -------------------------------------------------------

// Every libnccl.so* mapped into this process, by the path the loader recorded
// (dl_iterate_phdr, glibc's link map), deduplicated by realpath: two entries
// are two copies of NCCL, each with its own globals, which torch and the gate
// would then not share.
int collect_nccl(struct dl_phdr_info* info, size_t, void* data) {
  auto* found = static_cast<std::vector<std::string>*>(data);
  const char* name = info->dlpi_name;
  if (name == nullptr || *name == '\0') return 0;
  const char* base = std::strrchr(name, '/');
  base = base ? base + 1 : name;
  if (std::strncmp(base, "libnccl.so", 10) != 0) return 0;
  char real[PATH_MAX];
  std::string path = realpath(name, real) ? std::string(real) : std::string(name);
  for (const auto& p : *found)
    if (p == path) return 0;
  found->push_back(path);
  return 0;
}

std::vector<std::string> loaded_nccl_copies() {
  std::vector<std::string> found;
  dl_iterate_phdr(&collect_nccl, &found);
  return found;
}

// The version a copy reports through its own ncclGetVersion. RTLD_NOLOAD:
// only a library already mapped is returned, nothing new is loaded.
int version_of(const std::string& path, std::string* why) {
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (h == nullptr) {
    *why = std::string("dlopen(RTLD_NOLOAD) of ") + path + " failed: " + dlerror();
    return 0;
  }
  using GetVersionFn = ncclResult_t (*)(int*);
  auto fn = reinterpret_cast<GetVersionFn>(dlsym(h, "ncclGetVersion"));
  int version = 0;
  if (fn == nullptr || fn(&version) != ncclSuccess) {
    *why = path + " has no working ncclGetVersion";
    version = 0;
  }
  dlclose(h);  // drops only the reference taken above
  return version;
}

// The oldest NCCL the gate can drive: ncclConfig_t with `blocking`,
// ncclCommInitRankConfig and ncclCommFinalize came in 2.14.0. The loaded
// library may be older or newer than the nccl.h this build saw: init passes
// the header's sizeof and version, and NCCL copies only min(config->size, its
// own sizeof) and resets the fields a config's version predates
// (parseCommConfig, src/init.cc at v2.28.9-1 and v2.30.7-1), so a library older
// than the header ignores commName, and a newer one keeps its defaults for
// fields this header lacks. Neither is a reason to refuse it. Nor is a version
// other than torch.cuda.nccl.version(), which is the header torch was built
// with: users upgrade the nvidia-nccl wheel under torch, and torch then runs
// on the newer library too. What must hold is one copy, shared with torch.
constexpr int kMinNcclVersion = NCCL_VERSION(2, 14, 0);

struct NcclApi {
  std::string path;
  int version = 0;
  ncclResult_t (*GetVersion)(int*) = nullptr;
  ncclResult_t (*GetUniqueId)(ncclUniqueId*) = nullptr;
  ncclResult_t (*CommInitRankConfig)(ncclComm_t*, int, ncclUniqueId, int, ncclConfig_t*) = nullptr;
  ncclResult_t (*CommGetAsyncError)(ncclComm_t, ncclResult_t*) = nullptr;
  const char* (*GetErrorString)(ncclResult_t) = nullptr;
  const char* (*GetLastError)(ncclComm_t) = nullptr;
  ncclResult_t (*AllReduce)(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t,
                            cudaStream_t) = nullptr;
  ncclResult_t (*CommAbort)(ncclComm_t) = nullptr;
  ncclResult_t (*CommFinalize)(ncclComm_t) = nullptr;
  ncclResult_t (*CommDestroy)(ncclComm_t) = nullptr;
};

struct Scan {
  std::vector<std::string> copies;
  std::vector<int> versions;
  std::string why;  // empty: exactly one copy, usable
};

Scan scan_library() {
  Scan s;
  s.copies = loaded_nccl_copies();
  for (const auto& p : s.copies) {
    std::string why;
    s.versions.push_back(version_of(p, &why));
    if (!why.empty() && s.why.empty()) s.why = why;
  }
  if (s.copies.empty()) {
    s.why = "no libnccl.so is loaded in this process (torch loads libnccl.so.2 with libtorch_cuda.so; "
            "a torch without CUDA, or one that links NCCL statically, has none to share)";
  } else if (s.copies.size() > 1) {
    std::ostringstream os;
    os << s.copies.size() << " copies of NCCL are loaded in this process: ";
    for (size_t i = 0; i < s.copies.size(); ++i)
      os << (i ? " and " : "") << s.copies[i] << " (version code " << s.versions[i] << ")";
    os << "; the gate must use the one torch uses, and cannot tell which that is";
    s.why = os.str();
  }
  return s;
}

template <typename F>
void resolve(void* h, const char* name, F* fn, std::string* why) {
  *fn = reinterpret_cast<F>(dlsym(h, name));
  if (*fn == nullptr && why->empty()) *why = std::string("the loaded NCCL has no ") + name;
}

// The function table, from the single copy found at the first successful
// scan. What starts something new (a unique id, a communicator) rescans and
// refuses a second copy loaded since; calls on an existing communicator use
// the table as it is (the scan takes the loader's lock and a dlopen per copy).
const NcclApi& api(bool rescan = false) {
  static std::mutex mu;
  static std::unique_ptr<NcclApi> table;
  std::lock_guard<std::mutex> lock(mu);
  if (table && !rescan) return *table;
  Scan s = scan_library();
  TORCH_CHECK(s.why.empty(), "esper_gate NCCL: ", s.why);
  if (table && table->path == s.copies[0]) return *table;
  TORCH_CHECK(!table, "esper_gate NCCL: the NCCL library changed from ", table ? table->path : "",
              " to ", s.copies[0], " while the process ran");
  void* h = dlopen(s.copies[0].c_str(), RTLD_NOW | RTLD_NOLOAD);  // kept open for the process
  TORCH_CHECK(h != nullptr, "esper_gate NCCL: dlopen(RTLD_NOLOAD) of ", s.copies[0], " failed: ", dlerror());
  auto t = std::make_unique<NcclApi>();
  t->path = s.copies[0];
  std::string why;
  resolve(h, "ncclGetVersion", &t->GetVersion, &why);
  resolve(h, "ncclGetUniqueId", &t->GetUniqueId, &why);
  resolve(h, "ncclCommInitRankConfig", &t->CommInitRankConfig, &why);
  resolve(h, "ncclCommGetAsyncError", &t->CommGetAsyncError, &why);
  resolve(h, "ncclGetErrorString", &t->GetErrorString, &why);
  resolve(h, "ncclGetLastError", &t->GetLastError, &why);
  resolve(h, "ncclAllReduce", &t->AllReduce, &why);
  resolve(h, "ncclCommAbort", &t->CommAbort, &why);
  resolve(h, "ncclCommFinalize", &t->CommFinalize, &why);
  resolve(h, "ncclCommDestroy", &t->CommDestroy, &why);
  TORCH_CHECK(why.empty(), "esper_gate NCCL: ", why, " (", s.copies[0], ")");
  TORCH_CHECK(t->GetVersion(&t->version) == ncclSuccess, "esper_gate NCCL: ncclGetVersion failed in ",
              s.copies[0]);
  TORCH_CHECK(t->version >= kMinNcclVersion, "esper_gate NCCL: the loaded ", s.copies[0], " is version code ",
              t->version, ", older than the ", kMinNcclVersion, " the gate needs (ncclConfig_t with `blocking`, "
              "ncclCommInitRankConfig, ncclCommFinalize); upgrade NCCL (the nvidia-nccl wheel torch depends on)");
  table = std::move(t);
  return *table;
}

std::string library_info() {
  Scan s = scan_library();
  JsonObject j;
  j.list("copies", s.copies);
  j.str("path", s.copies.size() == 1 ? s.copies[0] : "");
  j.num("version", s.versions.size() == 1 ? s.versions[0] : 0);
  j.num("header_version", NCCL_VERSION_CODE);
  j.num("min_version", kMinNcclVersion);
  std::ostringstream versions;
  for (size_t i = 0; i < s.versions.size(); ++i) versions << (i ? "," : "") << s.versions[i];
  j.str("copy_versions", versions.str());
  j.str("why", s.why);
  return j.done();
}

// ---- unique id and config ---------------------------------------------------

at::Tensor unique_id() {
  const NcclApi& nccl = api(/*rescan=*/true);
  ncclUniqueId id;
  ncclResult_t r = nccl.GetUniqueId(&id);
  TORCH_CHECK(r == ncclSuccess, "esper_gate NCCL: ncclGetUniqueId failed: ", nccl.GetErrorString(r),
              " (", nccl.GetLastError(nullptr), ")");
  at::Tensor out = at::empty({NCCL_UNIQUE_ID_BYTES}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(out.data_ptr<uint8_t>(), id.internal, NCCL_UNIQUE_ID_BYTES);
  return out;
}

// What init passes. NCCL_CONFIG_INITIALIZER sets size, magic (NCCL_API_MAGIC)
// and version (this header's NCCL_VERSION_CODE) and leaves every option
// NCCL_CONFIG_UNDEF_* ("use NCCL's default"); the gate sets only blocking = 0:
// "nonblocking communicator ... ncclCommInitRankConfig returns ncclInProgress
// ... poll ncclCommGetAsyncError" (NCCL's user guide, Fault tolerance), which is
// what bounds construction by the gate's timeout.
ncclConfig_t gate_config() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 27, 0)  // ncclConfig_v22700 has commName (and the fields below)
  config.commName = "esper_gate";  // names the communicator in NCCL's logs
#endif
  return config;
}

std::string config_probe() {
  ncclConfig_t c = gate_config();
  JsonObject j;
  j.num("size", static_cast<long long>(c.size));
  j.num("magic", c.magic);
  j.num("version", c.version);
  j.num("blocking", c.blocking);
  j.num("cgaClusterSize", c.cgaClusterSize);
  j.num("minCTAs", c.minCTAs);
  j.num("maxCTAs", c.maxCTAs);
  j.num("splitShare", c.splitShare);
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 27, 0)
  j.num("trafficClass", c.trafficClass);
  j.str("commName", c.commName ? c.commName : "");
  j.num("collnetEnable", c.collnetEnable);
  j.num("CTAPolicy", c.CTAPolicy);
  j.num("shrinkShare", c.shrinkShare);
  j.num("nvlsCTAs", c.nvlsCTAs);
#endif
  j.num("undef_int", NCCL_CONFIG_UNDEF_INT);
  j.num("header_version", NCCL_VERSION_CODE);
  return j.done();
}

// ---- host-side CUDA hygiene -----------------------------------------------------

// Every CUDA and NCCL call of this file runs with the communicator's device
// set (c10::cuda::CUDAGuard, so no thread makes a context on GPU 0) and in
// thread-local capture mode: in the default global mode, another thread's
// torch.cuda.graph capture makes "potentially unsafe API calls" of this thread
// (cudaFree inside ncclCommAbort, event queries) an error that invalidates
// that capture (CUDA runtime API, cudaThreadExchangeStreamCaptureMode).
// PyTorch's ProcessGroupNCCL watchdog does the same (c10::cuda::CUDAStreamCaptureModeGuard).
struct CudaScope {
  c10::cuda::CUDAGuard device;
  cudaStreamCaptureMode mode = cudaStreamCaptureModeThreadLocal;
  explicit CudaScope(int dev) : device(static_cast<c10::DeviceIndex>(dev)) {
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  }
  ~CudaScope() { cudaThreadExchangeStreamCaptureMode(&mode); }
};

void check_device(int64_t device) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    TORCH_CHECK(false, "esper_gate NCCL: no CUDA device is usable in this process (cudaGetDeviceCount: ",
                cudaGetErrorString(e), "); the gate's own communicator needs the gate's GPU");
  }
  TORCH_CHECK(device >= 0 && device < count, "esper_gate NCCL: device ", device,
              " does not exist: this process sees ", count, " CUDA device(s)");
}

// The gate stream of a device: created once per process at the device's
// greatest priority (cudaDeviceGetStreamPriorityRange,
// cudaStreamCreateWithPriority, non-blocking w.r.t. the legacy stream) and never
// destroyed. Not one stream per communicator, because the caching allocator
// records an event on every stream a block was recordStream'ed to when that
// block is freed (CUDACachingAllocator.cpp, insert_events), which may be after
// the communicator is gone: a destroyed stream there is an invalid handle.
// Not c10's pool either (getStreamFromPool), whose streams other code shares and
// would queue behind a stuck all_reduce.
c10::cuda::CUDAStream gate_stream(int device) {
  static std::mutex mu;
  static std::unordered_map<int, cudaStream_t> streams;
  std::lock_guard<std::mutex> lock(mu);
  auto it = streams.find(device);
  if (it == streams.end()) {
    int least = 0, greatest = 0;
    C10_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    cudaStream_t s = nullptr;
    C10_CUDA_CHECK(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, greatest));
    it = streams.emplace(device, s).first;
  }
  return c10::cuda::getStreamFromExternal(it->second, static_cast<c10::DeviceIndex>(device));
}

// ---- communicators -------------------------------------------------------------

enum class Life { Live, Aborted, Destroyed };

// Runs f with `device` current and puts the thread's device back, throwing
// nothing: destructors call it, possibly late in the process's exit, when the
// CUDA runtime may already be unloading (a c10::cuda::CUDAGuard would throw
// there, and a throw from a destructor terminates the process). The way back
// never creates a context (csrc/nccl/device_scope.h says why).
struct C10DeviceApi {
  bool get(int* d) {
    c10::DeviceIndex i = -1;
    if (c10::cuda::GetDevice(&i) != cudaSuccess) return false;
    *d = i;
    return true;
  }
  bool set(int d) { return c10::cuda::SetDevice(static_cast<c10::DeviceIndex>(d)) == cudaSuccess; }
  void maybe_set(int d) { (void)c10::cuda::MaybeSetDevice(static_cast<c10::DeviceIndex>(d)); }
};

template <typename F>
void on_device_quietly(int device, F&& f) {
  C10DeviceApi api;
  ::esper_gate::on_device_quietly(api, device, std::forward<F>(f));
  (void)cudaGetLastError();
}

struct Comm {
  // Every NCCL call on `comm` holds `mu`. Each such call returns promptly:
  // the communicator is non-blocking, so init, all_reduce and finalize return
  // ncclInProgress instead of waiting for peers, and waits (the enqueue poll
  // in all_reduce_) release `mu` between polls. So abort, from any thread,
  // waits at most one short call for the lock.
  std::mutex mu;
  ncclComm_t comm = nullptr;
  int device = 0, rank = 0, world = 0;
  Life life = Life::Live;
  std::atomic<bool> aborting{false};  // set by abort before it takes `mu`
  cudaEvent_t caller_done = nullptr;  // recorded on the caller's stream, waited on by the gate stream
  cudaEvent_t gate_done = nullptr;    // recorded on the gate stream, waited on by the caller's stream
  cudaStream_t pending_caller = nullptr;  // the caller's stream of an all_reduce still being enqueued

  ~Comm() {
    // Only events here: the communicator itself was aborted or destroyed by
    // an explicit call (an NCCL call from a destructor could run after NCCL's
    // own teardown). cudaEventDestroy of an event still pending returns at
    // once; its resources go when it completes.
    on_device_quietly(device, [this] {
      if (caller_done) cudaEventDestroy(caller_done);
      if (gate_done) cudaEventDestroy(gate_done);
    });
  }
};

// Never destroyed: a communicator still registered at exit is left to the
// process's end, not destroyed by a static destructor after CUDA's teardown.
std::mutex& registry_mu = *new std::mutex;
std::unordered_map<int64_t, std::shared_ptr<Comm>>& registry =
    *new std::unordered_map<int64_t, std::shared_ptr<Comm>>;
int64_t next_handle = 1;

std::shared_ptr<Comm> lookup(int64_t handle) {
  std::lock_guard<std::mutex> lock(registry_mu);
  auto it = registry.find(handle);
  TORCH_CHECK(it != registry.end(), "esper_gate NCCL: no communicator with handle ", handle,
              " (never made, or released)");
  return it->second;
}

std::string error_text(const NcclApi& nccl, ncclComm_t comm, ncclResult_t r) {
  const char* last = nccl.GetLastError(comm);
  std::string text = nccl.GetErrorString(r);
  if (last && *last) text += std::string(": ") + last;
  return text;
}

// ncclCommGetAsyncError reads the communicator's recorded result (an atomic
// in NCCL's host state); it makes no CUDA call, so the thread that watches
// deadlines may poll it.
ncclResult_t async_state(const NcclApi& nccl, ncclComm_t comm) {
  ncclResult_t state = ncclSuccess;
  ncclResult_t r = nccl.CommGetAsyncError(comm, &state);
  return r == ncclSuccess ? state : r;
}

int64_t comm_init(const at::Tensor& id, int64_t rank, int64_t world, int64_t device) {
  const NcclApi& nccl = api(/*rescan=*/true);
  TORCH_CHECK(id.device().is_cpu() && id.scalar_type() == at::kByte && id.numel() == NCCL_UNIQUE_ID_BYTES,
              "esper_gate NCCL: the unique id must be ", NCCL_UNIQUE_ID_BYTES, " uint8 on the CPU, got ",
              id.numel(), " ", id.scalar_type(), " on ", id.device());
  TORCH_CHECK(world >= 1 && rank >= 0 && rank < world, "esper_gate NCCL: rank ", rank,
              " is not in a world of ", world, " (expected 0 <= rank < world, world >= 1)");
  check_device(device);
  // NCCL_COMM_BLOCKING overrides config.blocking (envConfigOverride, src/init.cc
  // at v2.28.9-1 and v2.30.7-1). With 1 the communicator is blocking: init and
  // every collective wait on the host for the peers, inside `mu`, and an abort
  // waits for `mu` behind them, so no deadline could end a wait. Python refuses
  // it first with a GateConfigError (esper_gate/_nccl.py); this is the backstop.
  const char* blocking = std::getenv("NCCL_COMM_BLOCKING");
  TORCH_CHECK(blocking == nullptr || std::atoi(blocking) != 1, "esper_gate NCCL: NCCL_COMM_BLOCKING=", blocking,
              " makes NCCL's communicators blocking, and the gate's must not be (a missing peer would block "
              "init and the collective with no deadline); unset it");
  auto c = std::make_shared<Comm>();
  c->device = static_cast<int>(device);
  c->rank = static_cast<int>(rank);
  c->world = static_cast<int>(world);
  ncclUniqueId uid;
  std::memcpy(uid.internal, id.contiguous().data_ptr<uint8_t>(), NCCL_UNIQUE_ID_BYTES);
  {
    CudaScope scope(c->device);  // NCCL binds the communicator to the current device
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&c->caller_done, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&c->gate_done, cudaEventDisableTiming));
    gate_stream(c->device);
    ncclConfig_t config = gate_config();
    ncclResult_t r = nccl.CommInitRankConfig(&c->comm, c->world, uid, c->rank, &config);
    // Non-blocking: ncclInProgress while the bootstrap waits for the peers.
    if (r != ncclSuccess && r != ncclInProgress) {
      std::string text = error_text(nccl, c->comm, r);
      if (c->comm != nullptr) nccl.CommAbort(c->comm);
      TORCH_CHECK(false, "esper_gate NCCL: ncclCommInitRankConfig(rank ", rank, " of ", world, ", cuda:",
                  device, ") failed: ", text);
    }
  }
  std::lock_guard<std::mutex> lock(registry_mu);
  int64_t handle = next_handle++;
  registry.emplace(handle, std::move(c));
  return handle;
}

std::string comm_state(int64_t handle) {
  auto c = lookup(handle);
  const NcclApi& nccl = api();
  if (c->aborting.load()) return "aborted";  // without waiting for the abort to finish
  std::lock_guard<std::mutex> lock(c->mu);
  if (c->life == Life::Aborted) return "aborted";
  if (c->life == Life::Destroyed) return "destroyed";
  ncclResult_t s = async_state(nccl, c->comm);
  if (s == ncclInProgress) return "pending";
  if (s == ncclSuccess) return "ready";
  return "error: " + error_text(nccl, c->comm, s);
}

// The caller's stream waits for the collective once NCCL has put it on the gate
// stream, and the allocator must not hand the buffer's memory to the caller's
// stream again before the gate stream is done with it. Called with `mu` held.
void order_after_enqueue(Comm& c, at::Tensor& buf, const c10::cuda::CUDAStream& gate) {
  C10_CUDA_CHECK(cudaEventRecord(c.gate_done, gate.stream()));
  C10_CUDA_CHECK(cudaStreamWaitEvent(c.pending_caller, c.gate_done, 0));
  c10::cuda::CUDACachingAllocator::recordStream(buf.storage().data_ptr(), gate);
  c.pending_caller = nullptr;
}

// Starts the gate's all_reduce: 0 when it is on the gate stream and the
// caller's stream ordered after it, 1 when NCCL still enqueues it.
//
// On a non-blocking communicator every collective of a world of two or more
// returns ncclInProgress: ncclGroupEndInternal hands the launch to a new
// thread (groupLaunchNonBlocking) and sets the communicator's async state to
// ncclInProgress until that thread is done (src/group.cc at v2.28.9-1 and
// v2.30.7-1). Only a world of one returns ncclSuccess here (ncclLaunchOneRank,
// no task and no thread). So every real call is enqueued in two steps: this
// one, then all_reduce_poll until ncclCommGetAsyncError says ncclSuccess; only
// then may the caller's stream wait on the gate stream (an event recorded
// before NCCL enqueued would let it run ahead of the collective). The waiting
// between polls is the Python side's (esper_gate/_nccl.py, wait_enqueued), so
// that its policy is one piece of code that the CPU double runs too.
int64_t all_reduce_start_(at::Tensor& buf, int64_t handle) {
  auto c = lookup(handle);
  const NcclApi& nccl = api();
  TORCH_CHECK(buf.is_cuda() && buf.device().index() == c->device, "esper_gate NCCL: the buffer is on ",
              buf.device(), " but the communicator is on cuda:", c->device);
  TORCH_CHECK(buf.scalar_type() == at::kLong && buf.is_contiguous(),
              "esper_gate NCCL: the buffer must be a contiguous int64 tensor, got ", buf.scalar_type(),
              buf.is_contiguous() ? "" : " (not contiguous)");
  CudaScope scope(c->device);
  // A captured all_reduce would replay with the buffer of the capture, and
  // the call number packed into it is a kernel argument of the captured pack
  // (see pack_cuda): refused, as pack is.
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              "esper_gate NCCL: all_reduce while the current stream is capturing a CUDA graph is refused: "
              "a replay would resend the captured call number. Call the gate outside graph capture.");
  c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(c->device));
  c10::cuda::CUDAStream gate = gate_stream(c->device);
  TORCH_CHECK(!c->aborting.load(), "esper_gate NCCL: the communicator (rank ", c->rank, " of ", c->world,
              ") was aborted; build a new one");
  std::lock_guard<std::mutex> lock(c->mu);
  TORCH_CHECK(c->life == Life::Live, "esper_gate NCCL: the communicator (rank ", c->rank, " of ", c->world,
              ") was ", c->life == Life::Aborted ? "aborted" : "destroyed", "; build a new one");
  ncclResult_t s = async_state(nccl, c->comm);
  TORCH_CHECK(s != ncclInProgress, "esper_gate NCCL: the communicator (rank ", c->rank, " of ", c->world,
              ") is not ready: its init or its previous call is still in progress (state() is 'pending')");
  TORCH_CHECK(s == ncclSuccess, "esper_gate NCCL: the communicator (rank ", c->rank, " of ", c->world,
              ") has failed: ", error_text(nccl, c->comm, s));
  // The gate stream starts when the caller's stream has produced the buffer.
  C10_CUDA_CHECK(cudaEventRecord(c->caller_done, caller.stream()));
  C10_CUDA_CHECK(cudaStreamWaitEvent(gate.stream(), c->caller_done, 0));
  c->pending_caller = caller.stream();
  ncclResult_t r = nccl.AllReduce(buf.data_ptr(), buf.data_ptr(), static_cast<size_t>(buf.numel()), ncclInt64,
                                  ncclSum, c->comm, gate.stream());
  TORCH_CHECK(r == ncclSuccess || r == ncclInProgress, "esper_gate NCCL: ncclAllReduce failed: ",
              error_text(nccl, c->comm, r));
  if (r == ncclInProgress) return 1;
  order_after_enqueue(*c, buf, gate);
  return 0;
}

// One look at an all_reduce that all_reduce_start_ left in progress: 1 while
// NCCL's launch thread still runs, 0 once it is on the gate stream (and the
// caller's stream was ordered after it). Raises when the communicator failed
// or was aborted meanwhile. Holds `mu` only for the look, so an abort from
// the deadline's thread never waits behind a poll.
int64_t all_reduce_poll(at::Tensor& buf, int64_t handle) {
  auto c = lookup(handle);
  const NcclApi& nccl = api();
  TORCH_CHECK(!c->aborting.load(), "esper_gate NCCL: the communicator (rank ", c->rank, " of ", c->world,
              ") was aborted while its all_reduce was being enqueued");
  CudaScope scope(c->device);
  std::lock_guard<std::mutex> lock(c->mu);
  TORCH_CHECK(c->life == Life::Live, "esper_gate NCCL: the communicator (rank ", c->rank, " of ", c->world,
              ") was aborted while its all_reduce was being enqueued");
  TORCH_CHECK(c->pending_caller != nullptr, "esper_gate NCCL: no all_reduce of the communicator (rank ", c->rank,
              " of ", c->world, ") is being enqueued");
  ncclResult_t s = async_state(nccl, c->comm);
  if (s == ncclInProgress) return 1;
  TORCH_CHECK(s == ncclSuccess, "esper_gate NCCL: ncclAllReduce failed: ", error_text(nccl, c->comm, s));
  order_after_enqueue(*c, buf, gate_stream(c->device));
  return 0;
}

// On the deadline the gate calls ncclCommAbort, not ncclCommRevoke or
// ncclCommShrink. nccl.h (2.30.7):
//   ncclCommAbort:  "Frees resources associated with communicator object and
//                    aborts any operations that might still be running on the
//                    device."
//   ncclCommRevoke: "stops all in-flight operations and marks communicator state
//                    as ncclInProgress. The state will change to ncclSuccess when
//                    the communicator is quiescent; then, management operations
//                    (destroy, split, shrink) can proceed safely."
//   ncclCommShrink: "Ranks in excludeRanksList will be removed form the existing
//                    communicator" (a new communicator of the survivors).
// Revoke leaves a second wait ("when the communicator is quiescent") and a
// destroy to do after it, on a path that must end within the gate's timeout;
// Shrink needs the survivors to agree on excludeRanksList, which is the
// diagnosis that runs only after the abort, and the gate has no use for a
// smaller communicator: a failed gate is unusable and a new one is built on
// every rank. Abort alone "aborts any operations that might still be running
// on the device" and frees the communicator, in one call. The header says
// nothing of threads; what makes it safe from the deadline's thread here is
// that every other call on this communicator is non-blocking and holds `mu`
// only for that call, so abort gets the lock promptly, and it is the last
// NCCL call on the handle (life becomes Aborted under the same lock).
// When another call holds the lock, `aborting` is set before waiting for it,
// so state() and a poll see the abort at once instead of queueing behind it.
//
// ncclCommAbort itself blocks, and can wait on the device: it sets the abort
// flags, then runs commReclaim in the caller's thread (destroyFlag makes its
// group blocking: ncclAsyncLaunch, src/group.cc), whose commDestroySync
// synchronizes NCCL's device stream (src/init.cc at v2.28.9-1 and v2.30.7-1).
// That stream waits on the gate stream, which waits on the caller's stream
// (caller_done). When the caller's stream is stuck behind another
// communicator's collective (a peer died during DDP's all_reduce), the abort
// returns only when that collective ends (NCCL issue #829 shows the stack).
// So the gate never calls it from a thread that must return: the failure
// path decides and latches the call's failure first, then aborts on a thread
// of its own and waits for it with a bound (esper_gate/_failure.py).
void comm_abort(int64_t handle) {
  std::shared_ptr<Comm> c;
  {
    // A handle released meanwhile (close() on another thread) was aborted or
    // destroyed by that release: nothing is left to abort.
    std::lock_guard<std::mutex> lock(registry_mu);
    auto it = registry.find(handle);
    if (it == registry.end()) return;
    c = it->second;
  }
  const NcclApi& nccl = api();
  CudaScope scope(c->device);
  std::unique_lock<std::mutex> lock(c->mu, std::try_to_lock);
  if (!lock.owns_lock()) {
    c->aborting.store(true);
    lock.lock();
  }
  if (c->life != Life::Live) {
    c->aborting.store(false);  // destroyed meanwhile: state() says so
    return;
  }
  c->aborting.store(true);
  c->life = Life::Aborted;
  ncclComm_t comm = c->comm;
  c->comm = nullptr;
  ncclResult_t r = nccl.CommAbort(comm);
  TORCH_CHECK(r == ncclSuccess || r == ncclInProgress, "esper_gate NCCL: ncclCommAbort failed: ",
              nccl.GetErrorString(r));
}

// The healthy end: ncclCommFinalize "flushes all issued communications, and
// marks communicator state as ncclInProgress. The state will change to
// ncclSuccess when the communicator is globally quiescent"; then
// ncclCommDestroy "can locally free the rest of the resources ... without
// blocking". Python polls nccl_comm_state between the two, with a bound, and
// aborts when finalize does not finish (a peer gone).
void comm_finalize(int64_t handle) {
  auto c = lookup(handle);
  const NcclApi& nccl = api();
  CudaScope scope(c->device);
  std::lock_guard<std::mutex> lock(c->mu);
  TORCH_CHECK(c->life == Life::Live, "esper_gate NCCL: finalize of a communicator that was ",
              c->life == Life::Aborted ? "aborted" : "destroyed");
  ncclResult_t r = nccl.CommFinalize(c->comm);
  TORCH_CHECK(r == ncclSuccess || r == ncclInProgress, "esper_gate NCCL: ncclCommFinalize failed: ",
              error_text(nccl, c->comm, r));
}

void comm_destroy(int64_t handle) {
  auto c = lookup(handle);
  const NcclApi& nccl = api();
  CudaScope scope(c->device);
  std::lock_guard<std::mutex> lock(c->mu);
  if (c->life != Life::Live) return;
  c->life = Life::Destroyed;
  ncclComm_t comm = c->comm;
  c->comm = nullptr;
  ncclResult_t r = nccl.CommDestroy(comm);
  TORCH_CHECK(r == ncclSuccess || r == ncclInProgress, "esper_gate NCCL: ncclCommDestroy failed: ",
              nccl.GetErrorString(r));
}

// Forgets the handle. A communicator still live is aborted first, so a
// release never leaks NCCL's threads and memory.
// An abort already running on another thread (possibly blocked on the device,
// see comm_abort) owns the communicator: the handle is forgotten without
// waiting for it, and the Comm lives on in that thread until its abort returns.
void comm_release(int64_t handle) {
  std::shared_ptr<Comm> c;
  {
    std::lock_guard<std::mutex> lock(registry_mu);
    auto it = registry.find(handle);
    if (it == registry.end()) return;
    c = it->second;
  }
  if (!c->aborting.load()) comm_abort(handle);
  std::lock_guard<std::mutex> lock(registry_mu);
  registry.erase(handle);
}

// ---- host-mapped words -------------------------------------------------------------

// n int64 words in pinned host memory mapped into the device's address space
// (cudaHostAlloc(cudaHostAllocMapped), cudaHostGetDevicePointer): a kernel
// reads and writes them through the device view, the host through the CPU
// view, with no CUDA call on the host side. Freed (cudaFreeHost) when both
// views are gone.
struct MappedBlock {
  void* host = nullptr;
  int device = 0;
  ~MappedBlock() {
    if (host) on_device_quietly(device, [this] { cudaFreeHost(host); });
  }
};

std::tuple<at::Tensor, at::Tensor> mapped_words(int64_t n, int64_t device) {
  TORCH_CHECK(n >= 1, "esper_gate NCCL: mapped words: n must be >= 1, got ", n);
  check_device(device);
  auto block = std::make_shared<MappedBlock>();
  block->device = static_cast<int>(device);
  void* dptr = nullptr;
  {
    CudaScope scope(block->device);
    C10_CUDA_CHECK(cudaHostAlloc(&block->host, static_cast<size_t>(n) * sizeof(int64_t), cudaHostAllocMapped));
    std::memset(block->host, 0, static_cast<size_t>(n) * sizeof(int64_t));
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&dptr, block->host, 0));
  }
  auto keep = [block](void*) {};
  at::Tensor host = at::for_blob(block->host, {n})
                        .deleter(keep)
                        .options(at::TensorOptions().dtype(at::kLong).device(at::kCPU))
                        .make_tensor();
  at::Tensor dev = at::for_blob(dptr, {n})
                       .deleter(keep)
                       .options(at::TensorOptions().dtype(at::kLong).device(at::kCUDA, device))
                       .target_device(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)))
                       .make_tensor();
  return {host, dev};
}

int64_t all_reduce_meta(at::Tensor&, int64_t) { return 0; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(esper_gate, m) {
  m.def("nccl_library_info() -> str");
  m.def("nccl_unique_id() -> Tensor");
  m.def("nccl_config_probe() -> str");
  m.def("nccl_comm_init(Tensor unique_id, int rank, int world, int device) -> int");
  m.def("nccl_comm_state(int comm) -> str");
  m.def("nccl_all_reduce_start_(Tensor(a!) buf, int comm) -> int");
  m.def("nccl_all_reduce_poll(Tensor(a!) buf, int comm) -> int");
  m.def("nccl_comm_abort(int comm) -> ()");
  m.def("nccl_comm_finalize(int comm) -> ()");
  m.def("nccl_comm_destroy(int comm) -> ()");
  m.def("nccl_comm_release(int comm) -> ()");
  m.def("nccl_mapped_words(int n, int device) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(esper_gate, CompositeImplicitAutograd, m) {
  m.impl("nccl_library_info", &library_info);
  m.impl("nccl_unique_id", &unique_id);
  m.impl("nccl_config_probe", &config_probe);
  m.impl("nccl_comm_init", &comm_init);
  m.impl("nccl_comm_state", &comm_state);
  m.impl("nccl_comm_abort", &comm_abort);
  m.impl("nccl_comm_finalize", &comm_finalize);
  m.impl("nccl_comm_destroy", &comm_destroy);
  m.impl("nccl_comm_release", &comm_release);
  m.impl("nccl_mapped_words", &mapped_words);
}

TORCH_LIBRARY_IMPL(esper_gate, CUDA, m) {
  m.impl("nccl_all_reduce_start_", &all_reduce_start_);
  m.impl("nccl_all_reduce_poll", &all_reduce_poll);
}

TORCH_LIBRARY_IMPL(esper_gate, Meta, m) {
  m.impl("nccl_all_reduce_start_", &all_reduce_meta);
  m.impl("nccl_all_reduce_poll", &all_reduce_meta);
}

}  // namespace esper_gate
