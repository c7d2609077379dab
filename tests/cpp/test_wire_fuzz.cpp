// Robustness of the decoder: whatever a reduced buffer holds, decoding it
// must stay in bounds, never decide a slot it cannot trust, and keep the
// report self-consistent. CMake also builds this file with
// -fsanitize=address,undefined, which turns any out-of-bounds read or
// undefined shift into a failure. The seed is fixed: a failure reproduces.
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "check.h"
#include "oracle.h"
#include "wire_sim.h"

using namespace eg_test;

namespace {

struct Shape {
  int64_t num_slots;
  int64_t world;
};

const Shape kShapes[] = {
    {1, 1},  {2, 1},  {3, 2},  {5, 3},   {8, 4},   {13, 7},  {1, 16},  {64, 16},
    {3, 63}, {8, 64}, {1, 64}, {2, 65},  {8, 100}, {3, 1024}, {1024, 1}, {1024, 64},
    {1024, 1024}};

constexpr int64_t kKnownFlags = (wire::kFlagSlotState << 1) - 1;
constexpr int64_t kKnownStatus = (wire::kStatusNoGate << 1) - 1;

// What must hold for any buffer, garbage or not.
void check_report_invariants(const Decoded& d) {
  const int64_t W = d.world;
  EXPECT_EQ(d.flags() & ~kKnownFlags, 0);
  EXPECT_EQ(d.flag(wire::kFlagExact), W <= wire::kMaxExactWorld);
  EXPECT_EQ(d.flag(wire::kFlagSlotState), d.slot_state);
  EXPECT(!(d.flag(wire::kFlagHeaderOk) && d.flag(wire::kFlagCorrupt)));
  EXPECT(d.global(wire::kGPoisonedRank) >= -1 && d.global(wire::kGPoisonedRank) < W);
  int64_t decided = 0, diverged = 0;
  for (int64_t s = 0; s < d.num_slots; ++s) {
    const int64_t st = d.status(s);
    CONTEXT("slot " << s << ", status " << st);
    EXPECT_EQ(st & ~kKnownStatus, 0);
    EXPECT_EQ(static_cast<bool>(d.decision[s]), (st & wire::kStatusDecided) != 0);
    if (st & wire::kStatusDecided) {
      EXPECT(d.flag(wire::kFlagHeaderOk));
      EXPECT((st & (wire::kStatusDiverged | wire::kStatusCorrupt)) == 0);
      EXPECT(st & wire::kStatusPolicyPassed);
      EXPECT((st & (wire::kStatusNoGate | wire::kStatusStateDiffers)) == 0);
    }
    EXPECT(d.slot(s)[wire::kSRootStage] >= 0 && d.slot(s)[wire::kSRootStage] <= wire::kMaxId);
    EXPECT(d.slot(s)[wire::kSRootTarget] >= 0 && d.slot(s)[wire::kSRootTarget] <= wire::kMaxId);
    decided += (st & wire::kStatusDecided) ? 1 : 0;
    diverged += (st & wire::kStatusDiverged) ? 1 : 0;
  }
  EXPECT_EQ(d.global(wire::kGDecidedSlots), decided);
  EXPECT_EQ(d.global(wire::kGDivergedSlots), diverged);
}

void check_untrusted(const Decoded& d) {
  EXPECT(!d.flag(wire::kFlagHeaderOk));
  EXPECT_EQ(d.global(wire::kGDecidedSlots), 0);
  EXPECT_EQ(d.global(wire::kGDivergedSlots), d.num_slots);
}

// Random but valid inputs: random votes, most slots agreeing on their state
// (stage, target, and when sent, policy and digest); some targets NO_GATE.
std::vector<RankInput> random_inputs(Rng& rng, const Shape& sh, int64_t policy) {
  const uint64_t seq = rng.next(), site = rng.next() & wire::field_mask(wire::kFieldSite);
  std::vector<RankInput> inputs(static_cast<size_t>(sh.world));
  std::vector<int64_t> stage(sh.num_slots), target(sh.num_slots), agree(sh.num_slots);
  std::vector<int64_t> slot_policy(sh.num_slots), digest(sh.num_slots);
  const bool with_policies = rng.below(2) != 0, with_digests = rng.below(2) != 0;
  for (int64_t s = 0; s < sh.num_slots; ++s) {
    stage[s] = rng.below(64);
    target[s] = rng.below(4) == 0 ? wire::kNoGate : rng.below(64);
    agree[s] = rng.below(5) != 0;
    slot_policy[s] = rng.below(wire::kNumPolicies);
    digest[s] = static_cast<int64_t>(rng.next() & wire::kDigestMask);
  }
  const int64_t vote_bias = rng.below(4);  // 0: all vote 1 ... 3: mostly 0
  for (auto& in : inputs) {
    in.header = header_values(seq, site, policy, sh.num_slots, sh.world);
    for (int64_t s = 0; s < sh.num_slots; ++s) {
      in.votes.push_back(vote_bias == 0 ? 1 : rng.below(4) >= vote_bias);
      in.stages.push_back(agree[s] || rng.below(2) ? stage[s] : rng.below(64));
      in.targets.push_back(agree[s] || rng.below(2) ? target[s] : rng.below(64));
      if (with_policies) in.policies.push_back(agree[s] || rng.below(2) ? slot_policy[s] : rng.below(4));
      if (with_digests) {
        in.digests.push_back(agree[s] || rng.below(2) ? digest[s]
                                                      : static_cast<int64_t>(rng.next() & wire::kDigestMask));
      }
    }
  }
  return inputs;
}

// The decisions a correct decoder must reach on valid inputs.
std::vector<uint8_t> expected_decisions(const std::vector<RankInput>& inputs, int64_t policy) {
  const int64_t W = static_cast<int64_t>(inputs.size());
  const int64_t n = static_cast<int64_t>(inputs[0].votes.size());
  std::vector<uint8_t> out(n);
  for (int64_t s = 0; s < n; ++s) {
    int64_t votes = 0;
    bool same = true;
    for (const auto& in : inputs) {
      votes += in.votes[s];
      same &= in.stages[s] == inputs[0].stages[s] && in.targets[s] == inputs[0].targets[s] &&
              in.policy(s) == inputs[0].policy(s) && in.digest(s) == inputs[0].digest(s);
    }
    const int64_t root = inputs[0].votes[s];
    const int64_t p = inputs[0].policy(s);  // the slot's own policy decides
    const bool pass = p == wire::kUnanimous ? votes == W
        : p == wire::kRank0                 ? root == 1
        : p == wire::kMajority              ? 2 * votes > W
                                            : votes >= 1;
    out[s] = same && pass && inputs[0].targets[s] != wire::kNoGate;
  }
  return out;
}

// ESPER_GATE_FUZZ_SCALE=N runs N times as many iterations (default 1).
int64_t fuzz_scale() {
  const char* env = std::getenv("ESPER_GATE_FUZZ_SCALE");
  const long long n = env ? std::atoll(env) : 1;
  return n >= 1 ? n : 1;
}

int64_t iterations_for(const Shape& sh, int64_t base) {
  const int64_t cost = sh.num_slots * (sh.world <= 64 ? sh.world : 8) + sh.world;
  return fuzz_scale() * (cost > 4096 ? 2 : cost > 512 ? base / 4 : base);
}

}  // namespace

TEST_CASE(random_words_are_flagged_corrupt) {
  Rng rng(0xE5BE2);
  for (const Shape& sh : kShapes) {
    const int64_t iters = iterations_for(sh, 1000);
    for (int64_t it = 0; it < iters; ++it) {
      // Either layout: the buffer's size picks it.
      const wire::Layout L = wire::make_layout(wire::capacity_for(sh.num_slots), sh.world, it % 2 == 0);
      CONTEXT("slots " << sh.num_slots << ", world " << sh.world << ", slot state " << L.slot_state
                       << ", iteration " << it);
      std::vector<int64_t> buf(static_cast<size_t>(L.total_words));
      for (auto& w : buf) w = rng.word();
      // Small values as well as huge ones: the fixed words of a near miss.
      if (it % 3 == 1) for (auto& w : buf) w = rng.below(2 * sh.world + 2) - 1;
      const Decoded d = decode_all(buf, sh.num_slots, sh.world, rng.below(wire::kNumPolicies));
      check_report_invariants(d);
      if (buf[wire::kWordPresence] != sh.world) {
        EXPECT(d.flag(wire::kFlagCorrupt));
      }
      check_untrusted(d);
    }
  }
}

TEST_CASE(random_words_behind_valid_fixed_words_are_not_trusted) {
  Rng rng(0xFACADE);
  for (const Shape& sh : kShapes) {
    const int64_t iters = iterations_for(sh, 1000);
    for (int64_t it = 0; it < iters; ++it) {
      const wire::Layout L = wire::make_layout(wire::capacity_for(sh.num_slots), sh.world, it % 4 < 2);
      CONTEXT("slots " << sh.num_slots << ", world " << sh.world << ", slot state " << L.slot_state
                       << ", iteration " << it);
      std::vector<int64_t> buf(static_cast<size_t>(L.total_words));
      for (auto& w : buf) w = it % 2 ? rng.word() : static_cast<int64_t>(rng.next() >> 1);
      buf[wire::kWordPresence] = sh.world;
      buf[wire::kWordRankSum] = sh.world * (sh.world + 1) / 2;
      buf[wire::kWordPoisonRank] = 0;
      const Decoded d = decode_all(buf, sh.num_slots, sh.world, rng.below(wire::kNumPolicies));
      check_report_invariants(d);
      check_untrusted(d);
    }
  }
}

TEST_CASE(valid_random_inputs_decide_as_expected) {
  Rng rng(0x5EED);
  for (const Shape& sh : kShapes) {
    if (sh.num_slots * sh.world > 20000) continue;  // packing cost; covered elsewhere
    const int64_t iters = iterations_for(sh, 48);
    for (int64_t it = 0; it < iters; ++it) {
      const int64_t policy = it % wire::kNumPolicies;
      CONTEXT("slots " << sh.num_slots << ", world " << sh.world << ", iteration " << it);
      const std::vector<RankInput> inputs = random_inputs(rng, sh, policy);
      const Decoded d = simulate(inputs, policy);
      check_report_invariants(d);
      EXPECT(d.header_ok);
      const std::vector<uint8_t> want = expected_decisions(inputs, policy);
      for (int64_t s = 0; s < sh.num_slots; ++s) {
        CONTEXT("slot " << s);
        EXPECT_EQ(static_cast<int>(d.decision[s]), static_cast<int>(want[s]));
      }
      // Every report word, not only the decisions.
      expect_report_matches(d.report, d.decision, oracle::decode(inputs, sh.num_slots, policy));
    }
  }
}

TEST_CASE(mutated_buffers_never_decide_silently_with_lanes) {
  // With lanes (W <= 64) every record bit is sent twice, so a single flipped
  // bit either leaves the decisions alone or is caught. Without lanes a
  // flipped vote counter is a different, valid-looking vote count, so there
  // only the invariants are checked.
  Rng rng(0xB17F11B);
  for (const Shape& sh : kShapes) {
    if (sh.num_slots * sh.world > 20000) continue;
    const int64_t bases = iterations_for(sh, 16);
    for (int64_t b = 0; b < bases; ++b) {
      const int64_t policy = rng.below(wire::kNumPolicies);
      const std::vector<RankInput> inputs = random_inputs(rng, sh, policy);
      const wire::Layout L =
          wire::make_layout(wire::capacity_for(sh.num_slots), sh.world, carries_slot_state(inputs));
      const std::vector<int64_t> good = reduce_ranks(inputs, sh.world);
      const Decoded clean = decode_all(good, sh.num_slots, sh.world, policy);
      for (int64_t m = 0; m < 40; ++m) {
        std::vector<int64_t> buf = good;
        const int64_t w = rng.below(L.total_words);
        const int64_t bit = rng.below(64);
        const int kind = static_cast<int>(rng.below(4));
        if (kind == 0) {
          buf[w] = rng.word();
        } else if (kind == 1) {
          buf[w] = static_cast<int64_t>(static_cast<uint64_t>(buf[w]) + 1);
        } else {
          buf[w] = static_cast<int64_t>(static_cast<uint64_t>(buf[w]) ^ (uint64_t{1} << bit));
        }
        CONTEXT("slots " << sh.num_slots << ", world " << sh.world << ", base " << b
                         << ", word " << w << ", mutation " << kind << ", bit " << bit);
        const Decoded d = decode_all(buf, sh.num_slots, sh.world, policy);
        check_report_invariants(d);
        if (L.exact && kind >= 2 && d.flag(wire::kFlagHeaderOk)) {
          for (int64_t s = 0; s < sh.num_slots; ++s) {
            CONTEXT("slot " << s);
            EXPECT_EQ(static_cast<int>(d.decision[s]), static_cast<int>(clean.decision[s]));
          }
        }
      }
    }
  }
}

int main(int argc, char** argv) { return run_all(argc, argv); }
