// A tiny test harness (no external framework): TEST(name) { CHECK(...); } and RUN_ALL_TESTS() in main.
#pragma once
#include <cstdio>
#include <exception>
#include <functional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "finequant/error.h"
#include "finequant/tensor.h"

namespace fqtest {

struct State {
  std::vector<std::pair<const char*, std::function<void()>>> tests;
  int failures_in_test = 0;
};
inline State& state() {
  static State s;
  return s;
}
struct Register {
  Register(const char* name, std::function<void()> fn) { state().tests.emplace_back(name, std::move(fn)); }
};
inline void report(const char* file, int line, const std::string& what) {
  std::printf("  %s:%d: %s\n", file, line, what.c_str());
  ++state().failures_in_test;
}
// An F32 tensor of normal(shift, sd) values.
inline finequant::Tensor random_tensor(finequant::Shape shape, std::mt19937& rng, float shift = 0.f, float sd = 1.f) {
  finequant::Tensor t = finequant::Tensor::empty(finequant::DType::F32, std::move(shape));
  std::normal_distribution<float> nd(shift, sd);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = nd(rng);
  return t;
}

inline const char* kind_name(finequant::ErrorKind k) {
  switch (k) {
    case finequant::ErrorKind::InvalidArgument: return "InvalidArgument";
    case finequant::ErrorKind::ModelFormat: return "ModelFormat";
    case finequant::ErrorKind::Unsupported: return "Unsupported";
    case finequant::ErrorKind::ResourceLimit: return "ResourceLimit";
    case finequant::ErrorKind::Runtime: return "Runtime";
  }
  return "?";
}

// Runs every registered test; returns the process exit code.
inline int run_all() {
  int passed = 0, failed = 0;
  for (auto& [name, fn] : state().tests) {
    state().failures_in_test = 0;
    try {
      fn();
    } catch (const std::exception& e) {
      report(name, 0, std::string("uncaught exception: ") + e.what());
    }
    if (state().failures_in_test) {
      std::printf("FAIL %s\n", name);
      ++failed;
    } else {
      ++passed;
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}

}  // namespace fqtest

#define FQ_TEST_CAT2(a, b) a##b
#define FQ_TEST_CAT(a, b) FQ_TEST_CAT2(a, b)
#define TEST(name)                                                                   \
  static void name();                                                                \
  static ::fqtest::Register FQ_TEST_CAT(fq_register_, name)(#name, name);            \
  static void name()

#define CHECK(cond)                                                         \
  do {                                                                      \
    if (!(cond)) ::fqtest::report(__FILE__, __LINE__, "CHECK(" #cond ")"); \
  } while (0)

#define CHECK_EQ(a, b)                                                                                  \
  do {                                                                                                  \
    auto fq_a_ = (a);                                                                                   \
    auto fq_b_ = (b);                                                                                   \
    if (!(fq_a_ == fq_b_))                                                                              \
      ::fqtest::report(__FILE__, __LINE__,                                                              \
                       "CHECK_EQ(" #a ", " #b "): " + std::to_string(fq_a_) + " != " + std::to_string(fq_b_)); \
  } while (0)

// expr must throw finequant::Error of the given ErrorKind; optional substring of the message.
#define CHECK_THROWS_KIND_MSG(expr, expected_kind, substr)                                                        \
  do {                                                                                                   \
    try {                                                                                                \
      (void)(expr);                                                                                      \
      ::fqtest::report(__FILE__, __LINE__, "no exception from " #expr);                                \
    } catch (const ::finequant::Error& fq_e_) {                                                          \
      if (fq_e_.kind() != (expected_kind))                                                                        \
        ::fqtest::report(__FILE__, __LINE__, std::string("wrong kind ") + ::fqtest::kind_name(fq_e_.kind()) + \
                                                 " from " #expr ": " + fq_e_.what());                   \
      else if (std::string(fq_e_.what()).find(substr) == std::string::npos)                              \
        ::fqtest::report(__FILE__, __LINE__, std::string("message of " #expr " lacks '") + (substr) +    \
                                                 "': " + fq_e_.what());                                  \
    } catch (const std::exception& fq_e_) {                                                              \
      ::fqtest::report(__FILE__, __LINE__, std::string("non-finequant exception from " #expr ": ") +   \
                                               fq_e_.what());                                            \
    }                                                                                                    \
  } while (0)
#define CHECK_THROWS_KIND(expr, expected_kind) CHECK_THROWS_KIND_MSG(expr, expected_kind, "")

#define RUN_ALL_TESTS() ::fqtest::run_all()
