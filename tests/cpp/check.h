// A tiny test harness for the C++ unit tests: no framework can be fetched in
// CI, and these tests need only named cases, checks that print both values
// with file:line, and a non-zero exit status when anything failed.
//
//   TEST_CASE(layout_sizes) { EXPECT_EQ(make_layout(1, 1).total_words, 9); }
//   int main(int argc, char** argv) { return eg_test::run_all(argc, argv); }
//
// `./test_x name...` runs only the named cases; `./test_x --list` lists them.
// CONTEXT(...) adds a line (e.g. the world size a loop is on) to every failure
// reported while it is in scope. The macros are EXPECT*, not CHECK*, because
// c10's logging header already defines CHECK, CHECK_EQ, ...
#pragma once

#include <cstdint>
#include <cstdio>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace eg_test {

struct Case {
  const char* name;
  void (*fn)();
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

struct Registrar {
  Registrar(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

struct State {
  int64_t checks = 0;
  int64_t failures = 0;        // in the current case
  int64_t total_failures = 0;
  std::vector<std::string> context;
};

inline State& state() {
  static State s;
  return s;
}

// Failures past this many in one case are counted but not printed: a broken
// loop over 1024 slots should not bury the first message.
constexpr int64_t kMaxPrintedFailures = 20;

inline void report_failure(const char* file, int line, const std::string& what) {
  State& s = state();
  ++s.failures;
  ++s.total_failures;
  if (s.failures > kMaxPrintedFailures) return;
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
  for (const auto& c : s.context) std::fprintf(stderr, "    with %s\n", c.c_str());
  if (s.failures == kMaxPrintedFailures) {
    std::fprintf(stderr, "    (further failures in this case are counted, not printed)\n");
  }
}

template <typename T>
std::string show(const T& v) {
  std::ostringstream os;
  if constexpr (std::is_same_v<T, bool>) {
    os << (v ? "true" : "false");
  } else if constexpr (std::is_integral_v<T> && sizeof(T) == 1) {
    os << static_cast<int>(v);
  } else {
    os << v;
  }
  return os.str();
}

template <typename A, typename B>
bool check_cmp(
    const char* file, int line, const char* op, const char* ea, const char* eb, const A& a,
    const B& b, bool ok) {
  ++state().checks;
  if (!ok) {
    report_failure(
        file, line,
        std::string(ea) + " " + op + " " + eb + "  (" + show(a) + " vs " + show(b) + ")");
  }
  return ok;
}

class ContextScope {
 public:
  explicit ContextScope(std::string line) { state().context.push_back(std::move(line)); }
  ~ContextScope() { state().context.pop_back(); }
  ContextScope(const ContextScope&) = delete;
  ContextScope& operator=(const ContextScope&) = delete;
};

inline int run_all(int argc, char** argv) {
  std::vector<std::string> only(argv + 1, argv + argc);
  if (only.size() == 1 && only[0] == "--list") {
    for (const auto& c : registry()) std::printf("%s\n", c.name);
    return 0;
  }
  int ran = 0, failed = 0;
  for (const auto& c : registry()) {
    if (!only.empty()) {
      bool wanted = false;
      for (const auto& o : only) wanted |= o == c.name;
      if (!wanted) continue;
    }
    state().failures = 0;
    const int64_t checks_before = state().checks;
    c.fn();
    ++ran;
    const int64_t checks = state().checks - checks_before;
    if (state().failures != 0) {
      ++failed;
      std::printf("[FAIL] %s (%lld of %lld checks failed)\n", c.name,
                  static_cast<long long>(state().failures), static_cast<long long>(checks));
    } else {
      std::printf("[ ok ] %s (%lld checks)\n", c.name, static_cast<long long>(checks));
    }
  }
  if (ran == 0) {
    std::fprintf(stderr, "no test case matched the names given\n");
    return 2;
  }
  std::printf("%d of %d cases passed, %lld checks\n", ran - failed, ran,
              static_cast<long long>(state().checks));
  return failed == 0 ? 0 : 1;
}

}  // namespace eg_test

#define EG_CONCAT_INNER(a, b) a##b
#define EG_CONCAT(a, b) EG_CONCAT_INNER(a, b)

#define TEST_CASE(name)                                                   \
  static void test_case_##name();                                         \
  static const ::eg_test::Registrar registrar_##name(#name, &test_case_##name); \
  static void test_case_##name()

// Evaluates the condition once; returns whether it held, so a check can guard
// what follows (`if (!EXPECT(n > 0)) return;`).
#define EXPECT(cond)                                                             \
  ([&]() -> bool {                                                              \
    ++::eg_test::state().checks;                                                \
    const bool eg_ok_ = static_cast<bool>(cond);                                \
    if (!eg_ok_) ::eg_test::report_failure(__FILE__, __LINE__, #cond);          \
    return eg_ok_;                                                              \
  }())

#define EG_EXPECT_CMP(a, b, op)                                                  \
  ([&]() -> bool {                                                              \
    const auto& eg_a_ = (a);                                                    \
    const auto& eg_b_ = (b);                                                    \
    return ::eg_test::check_cmp(__FILE__, __LINE__, #op, #a, #b, eg_a_, eg_b_,  \
                                eg_a_ op eg_b_);                                \
  }())

#define EXPECT_EQ(a, b) EG_EXPECT_CMP(a, b, ==)
#define EXPECT_NE(a, b) EG_EXPECT_CMP(a, b, !=)
#define EXPECT_LT(a, b) EG_EXPECT_CMP(a, b, <)
#define EXPECT_LE(a, b) EG_EXPECT_CMP(a, b, <=)
#define EXPECT_GT(a, b) EG_EXPECT_CMP(a, b, >)
#define EXPECT_GE(a, b) EG_EXPECT_CMP(a, b, >=)

#define CONTEXT(stream_expr)                                                    \
  const ::eg_test::ContextScope EG_CONCAT(eg_context_, __LINE__)(               \
      [&] {                                                                     \
        std::ostringstream eg_os_;                                              \
        eg_os_ << stream_expr;                                                  \
        return eg_os_.str();                                                    \
      }())
