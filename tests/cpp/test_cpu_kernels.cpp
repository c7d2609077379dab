// The CPU kernels (esper_gate::pack_cpu / decode_cpu) and the registered ops
// against the independent oracle of tests/cpp/oracle.h: the buffers word for
// word, every report word and every decision. (wire_sim.h only supplies the
// inputs: it calls the same wire:: functions as the kernels, so matching it
// would prove nothing about the bit logic.)
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "check.h"
#include "esper_gate.h"
#include "oracle.h"
#include "wire_sim.h"

using namespace eg_test;

namespace {

at::Tensor long_tensor(const std::vector<int64_t>& v) {
  return at::tensor(at::ArrayRef<int64_t>(v), at::kLong);
}

at::Tensor bool_tensor(const std::vector<int64_t>& v) {
  return long_tensor(v).to(at::kBool);
}

std::vector<int64_t> to_vector(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kLong).contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

struct Scenario {
  const char* name;
  int64_t num_slots, world, policy;
  int bad_rank;   // -1: none; else this rank votes 2 in slot 0
  int bad_rank2;  // -1: none; else this rank sends target 64 in the last slot
  int late_rank;  // -1: none; else this rank is one call ahead (seq + 1)
  // Per-slot policies and digests sent as tensors; one rank in three holds
  // another digest in the last slot, and slot 0 has no gate on every rank.
  bool slot_state = false;
};

const Scenario kScenarios[] = {
    {"one rank", 1, 1, wire::kUnanimous, -1, -1, -1},
    {"four ranks, majority", 3, 4, wire::kMajority, -1, -1, -1},
    {"64 ranks, rank0", 5, 64, wire::kRank0, -1, -1, -1},
    {"65 ranks, any", 4, 65, wire::kAny, -1, -1, -1},
    {"100 ranks, unanimous", 7, 100, wire::kUnanimous, -1, -1, -1},
    {"1024 ranks, majority", 2, 1024, wire::kMajority, -1, -1, -1},
    {"poisoned rank 2 of 5", 3, 5, wire::kAny, 2, -1, -1},
    {"poisoned rank 70 of 80", 2, 80, wire::kAny, 70, -1, -1},
    {"poisoned ranks 1 and 3 of 64", 4, 64, wire::kAny, 1, 3, -1},
    {"poisoned ranks 0 and 1 of 65", 4, 65, wire::kAny, 0, 1, -1},
    {"rank 3 of 6 a call ahead", 3, 6, wire::kRank0, -1, -1, 3},
    {"rank 90 of 128 a call ahead", 3, 128, wire::kUnanimous, -1, -1, 90},
    {"slot policies and digests, 5 ranks", 4, 5, wire::kUnanimous, -1, -1, -1, true},
    {"slot policies and digests, 70 ranks", 3, 70, wire::kAny, -1, -1, -1, true},
    {"a bad policy code, 6 ranks", 3, 6, wire::kAny, -1, -1, -1, true},
};

}  // namespace

TEST_CASE(cpu_kernels_match_the_oracle) {
  Rng rng(7);
  for (const Scenario& sc : kScenarios) {
    CONTEXT(sc.name);
    std::vector<RankInput> inputs;
    for (int64_t r = 0; r < sc.world; ++r) {
      RankInput in = agreeing_input(sc.num_slots, sc.world, sc.policy);
      for (int64_t s = 0; s < sc.num_slots; ++s) {
        in.votes[s] = rng.below(3) != 0;
        if (s == 1 && r % 3 == 1) in.stages[s] = rng.below(64);  // some divergence
      }
      if (r == sc.bad_rank) in.votes[0] = 2;
      if (r == sc.bad_rank2) in.targets[sc.num_slots - 1] = 64;
      if (r == sc.late_rank) in.header.seq += 1;
      if (sc.slot_state) {
        in.targets[0] = wire::kNoGate;
        for (int64_t s = 0; s < sc.num_slots; ++s) {
          in.policies.push_back((s + 1) % wire::kNumPolicies);
          in.digests.push_back(0x9E3779B1ll * (s + 1) & 0xFFFFFFFFll);
        }
        if (r % 3 == 2) in.digests[sc.num_slots - 1] ^= 0x10000ll;
        if (sc.name[0] == 'a' && r == 4) in.policies[1] = 7;  // poisons rank 4
      }
      inputs.push_back(in);
    }
    at::Tensor sum = at::zeros({0}, at::kLong);
    for (int64_t r = 0; r < sc.world; ++r) {
      const RankInput& in = inputs[r];
      // Alternate vote dtypes: the kernel reads bool and int64 votes.
      const at::Tensor votes = r % 2 == 0 || r == sc.bad_rank ? long_tensor(in.votes) : bool_tensor(in.votes);
      const auto header = esper_gate::make_header(
          static_cast<int64_t>(in.header.seq), static_cast<int64_t>(in.header.site), sc.policy,
          sc.num_slots, sc.world, 0);
      std::optional<at::Tensor> policies, digests;
      if (sc.slot_state) {
        policies = long_tensor(in.policies);
        digests = long_tensor(in.digests);
      }
      const at::Tensor packed = esper_gate::pack_cpu(
          esper_gate::pack_call(header, sc.num_slots, r, sc.world, votes.options(), policies, digests), votes,
          long_tensor(in.stages), long_tensor(in.targets));
      CONTEXT("rank " << r);
      EXPECT_EQ(packed.scalar_type(), at::kLong);
      const std::vector<int64_t> want = oracle::buffer(in, r, sc.world, sc.slot_state);
      const std::vector<int64_t> got = to_vector(packed);
      if (!EXPECT_EQ(got.size(), want.size())) continue;
      for (size_t w = 0; w < want.size(); ++w) {
        if (!EXPECT_EQ(got[w], want[w])) break;
      }
      sum = sum.numel() == 0 ? packed.clone() : sum + packed;
    }
    const oracle::Expected want = oracle::decode(inputs, sc.num_slots, sc.policy);
    at::Tensor decision, report;
    std::tie(decision, report) = esper_gate::decode_cpu(
        esper_gate::decode_call(esper_gate::decode_layout("esper_gate.decode", sum, sc.num_slots, sc.world),
                                sc.num_slots, sc.world, sc.policy, sum.options()),
        sum);
    EXPECT_EQ(decision.scalar_type(), at::kBool);
    EXPECT_EQ(report.scalar_type(), at::kLong);
    const std::vector<int64_t> got_report = to_vector(report);
    const std::vector<int64_t> got = to_vector(decision);
    expect_report_matches(got_report, std::vector<uint8_t>(got.begin(), got.end()), want);
    // The scenarios themselves, so a wrong oracle cannot hide behind agreement.
    const int64_t bad_policy = sc.slot_state && sc.name[0] == 'a' ? 1 : 0;
    const int64_t poisoned = (sc.bad_rank >= 0) + (sc.bad_rank2 >= 0) + bad_policy;
    EXPECT_EQ((want.report[wire::kGFlags] & wire::kFlagPoisoned) != 0, poisoned > 0);
    EXPECT_EQ(want.report[wire::kGPoisonCount], poisoned);
    EXPECT_EQ(want.report[wire::kGPoisonedRank], poisoned == 1 ? (bad_policy ? 4 : sc.bad_rank) : -1);
    if (sc.slot_state && !bad_policy) {
      EXPECT_EQ(want.report[wire::slots_offset() + wire::kSStatus] & wire::kStatusNoGate, wire::kStatusNoGate);
      EXPECT(want.report[wire::slots_offset() + wire::kSlotWords * (sc.num_slots - 1) + wire::kSStatus] &
             wire::kStatusDigestDiffers);
    }
    EXPECT_EQ((want.report[wire::kGFlags] & wire::kFlagSeqMismatch) != 0, sc.late_rank >= 0);
    EXPECT_EQ((want.report[wire::kGFlags] & wire::kFlagHeaderOk) != 0, poisoned == 0 && sc.late_rank < 0);
  }
}

TEST_CASE(registered_ops_match_the_oracle) {
  auto pack = c10::Dispatcher::singleton()
                  .findSchemaOrThrow("esper_gate::pack", "")
                  .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    int64_t, int64_t, c10::string_view, int64_t, int64_t, int64_t,
                                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  auto decode = c10::Dispatcher::singleton()
                    .findSchemaOrThrow("esper_gate::decode", "")
                    .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, int64_t,
                                                              c10::string_view)>();
  const int64_t world = 3, n = 2;
  std::vector<RankInput> inputs;
  at::Tensor sum;
  for (int64_t r = 0; r < world; ++r) {
    RankInput in = agreeing_input(n, world, wire::kMajority);
    in.votes = {r != 2, r == 0};
    // Slot 1 under rank0 (rank 0 alone votes yes, and decides it); the header's majority elsewhere.
    in.policies = {wire::kMajority, wire::kRank0};
    in.digests = {12345, 0xFFFFFFFFll};
    inputs.push_back(in);
    const at::Tensor b = pack.call(bool_tensor(in.votes), long_tensor(in.stages), long_tensor(in.targets),
                                   static_cast<int64_t>(in.header.seq), static_cast<int64_t>(in.header.site),
                                   "majority", r, world, 0, long_tensor(in.policies), long_tensor(in.digests));
    EXPECT(to_vector(b) == oracle::buffer(in, r, world, true));
    sum = r == 0 ? b : sum + b;
  }
  at::Tensor decision, report;
  std::tie(decision, report) = decode.call(sum, n, world, "majority");
  EXPECT(to_vector(report) == oracle::decode(inputs, n, wire::kMajority).report);
  EXPECT(to_vector(decision) == (std::vector<int64_t>{1, 1}));
}

TEST_CASE(make_header_names_a_bad_site_unless_the_caller_did) {
  auto h = esper_gate::make_header(int64_t{1} << 40 | 5, 7, wire::kAny, 3, 4, 0);
  EXPECT_EQ(h.seq, uint64_t{5});
  EXPECT_EQ(h.reason, uint64_t{wire::kReasonNone});
  h = esper_gate::make_header(1, int64_t{1} << 32, wire::kAny, 3, 4, 0);
  EXPECT_EQ(h.reason, uint64_t{wire::kReasonSite});
  EXPECT_EQ(h.poison, uint64_t{1});
  h = esper_gate::make_header(1, -1, wire::kAny, 3, 4, wire::kReasonCallerMin);
  EXPECT_EQ(h.reason, uint64_t{wire::kReasonCallerMin});
}

TEST_CASE(decode_checks_name_the_offending_values) {
  bool threw = false;
  const int64_t core = wire::make_layout(4, 4, false).total_words;
  const int64_t with_state = wire::make_layout(4, 4, true).total_words;
  try {
    esper_gate::decode_layout("esper_gate.decode", at::zeros({5}, at::kLong), 3, 4);
  } catch (const c10::ValueError& e) {
    threw = true;
    const std::string msg = e.what_without_backtrace();
    CONTEXT("message: " << msg);
    EXPECT(msg.find("expected a reduced buffer of " + std::to_string(core) + " words (no per-slot policies or "
                    "digests) or " + std::to_string(with_state) + " words (with them)") != std::string::npos);
    EXPECT(msg.find("got 5") != std::string::npos);
  }
  EXPECT(threw);
  // Each size picks its layout.
  EXPECT(!esper_gate::decode_layout("esper_gate.decode", at::zeros({core}, at::kLong), 3, 4).slot_state);
  EXPECT(esper_gate::decode_layout("esper_gate.decode", at::zeros({with_state}, at::kLong), 3, 4).slot_state);
}

int main(int argc, char** argv) { return run_all(argc, argv); }
