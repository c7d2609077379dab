// What one sync accepts: slot and world limits, id range, policies and the
// bad-input reason codes. The header field widths in layout.h are derived
// from these, so raising a limit widens its field.
#pragma once

#include <cstdint>

namespace esper_gate {
namespace wire {

constexpr int64_t kMaxSlots = 1024;
// Counters grow with log2(W) and the world field is sized from this, so the
// format serves the largest single training jobs; only lanes are capped lower.
constexpr int64_t kMaxWorld = 65536;
constexpr int64_t kMaxExactWorld = 64;  // lanes (exact per-rank report) up to here
constexpr int64_t kIdBits = 6;
constexpr int64_t kMaxId = (int64_t{1} << kIdBits) - 1;  // stage and target ids are 0..63
constexpr int64_t kBitsPerWord = 63;    // the sign bit is never used
// The target id a slot sends when it has no gate this call: the slot still
// takes part (every rank learns its decision and divergence), it is never
// decided, and a rank at a gate where another has none diverges on it. It is
// the largest id, so gate ids 0..kMaxId-1 stay free (Esper's G0 is 0).
constexpr int64_t kNoGate = kMaxId;
// Each slot may carry a digest of state the stage and target do not show
// (Esper: alpha step, controller mode, seed and blueprint identity), checked
// for equality across ranks like the stage. 32 bits: two ranks whose states
// differ go unnoticed with probability 2^-32 per slot and call, as two
// layouts do under the 32-bit site fingerprint; docs/wire-format.md weighs
// it against the buffer it costs at 65,536 ranks and 1024 slots.
constexpr int64_t kDigestBits = 32;
constexpr uint64_t kDigestMask = (uint64_t{1} << kDigestBits) - 1;

enum Policy : int64_t {
  kUnanimous = 0,
  kRank0 = 1,
  kMajority = 2,
  kAny = 3,
};
constexpr int64_t kNumPolicies = 4;

// Bad-input reason codes. 1..15 are found by the pack kernel; 16..31 are
// declared by the caller (the Python wrapper validates dtypes and shapes and
// passes its code).
enum Reason : int64_t {
  kReasonNone = 0,
  kReasonVote = 1,      // a vote that is neither 0 nor 1
  kReasonStage = 2,     // a stage id outside 0..kMaxId
  kReasonTarget = 3,    // a target id outside 0..kMaxId
  kReasonSite = 4,      // a site fingerprint outside 0..2^32-1
  kReasonPolicy = 5,    // a slot policy code outside 0..kNumPolicies-1
  kReasonDigest = 6,    // a slot digest outside 0..2^kDigestBits-1
  kReasonCallerMin = 16,
  kReasonMax = 31,
};

// Bits needed to write v (v >= 0); constexpr so field widths follow the limits.
constexpr int64_t bits_for(int64_t v) {
  int64_t n = 0;
  while (v > 0) {
    ++n;
    v >>= 1;
  }
  return n;
}

}  // namespace wire
}  // namespace esper_gate
