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
