#include "layers/strategy.h"

#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "finequant/error.h"

namespace finequant {

namespace {

using json = nlohmann::json;

[[noreturn]] void corrupt(const std::string& path, const std::string& what) {
  fail(ErrorKind::ModelFormat, "strategy table " + path + ": " + what +
                                   " (rerun `finequant tune`, or load with strategy='off')");
}

const char* precision_name(kernels::FloatPrecision p) { return p == kernels::FloatPrecision::BF16 ? "bf16" : "fp32"; }

}  // namespace

bool LinearStrategy::any() const {
  for (uint8_t u : use_alternative)
    if (u) return true;
  return false;
}

bool LinearStrategy::chooses_alternative(int64_t M) const {
  for (size_t i = 0; i < bucket_max.size(); ++i)
    if (M <= bucket_max[i]) return use_alternative[i] != 0;
  return false;  // unreachable: the last bucket is unbounded
}

StrategyTable StrategyTable::read(const std::string& path) {
  std::ifstream in(path);
  FQ_CHECK(in.good(), ErrorKind::InvalidArgument, "strategy table " + path + " cannot be opened");
  std::stringstream ss;
  ss << in.rdbuf();
  json j;
  try {
    j = json::parse(ss.str());
  } catch (const json::exception& e) {
    corrupt(path, std::string("not valid JSON: ") + e.what());
  }
  StrategyTable t;
  t.path = path;
  if (!j.is_object() || j.value("format", json()) != "finequant-strategy") corrupt(path, "'format' is not 'finequant-strategy'");
  if (j.value("version", json()) != 1) corrupt(path, "unsupported 'version' (this build reads version 1)");
  for (const char* key : {"cpu", "backend"}) {
    if (!j.contains(key) || !j[key].is_string()) corrupt(path, std::string("'") + key + "' must be a string");
  }
  t.cpu = j["cpu"].get<std::string>();
  t.backend = j["backend"].get<std::string>();
  // buckets: [[lo, hi], ...] contiguous from 1, the last one [lo, null] (no upper bound)
  const json& buckets = j.value("buckets", json());
  if (!buckets.is_array() || buckets.empty()) corrupt(path, "'buckets' must be a non-empty list of [lo, hi]");
  int64_t next_lo = 1;
  for (size_t i = 0; i < buckets.size(); ++i) {
    const json& b = buckets[i];
    const bool last = i + 1 == buckets.size();
    if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() || b[0].get<int64_t>() != next_lo ||
        !(last ? b[1].is_null() : (b[1].is_number_integer() && b[1].get<int64_t>() >= next_lo)))
      corrupt(path, "bucket " + std::to_string(i) + " must be [" + std::to_string(next_lo) +
                        (last ? ", null]" : ", hi >= lo]") + " (buckets cover M = 1, 2, ... without gaps)");
    const int64_t hi = last ? std::numeric_limits<int64_t>::max() : b[1].get<int64_t>();
    t.bucket_max.push_back(hi);
    if (!last) next_lo = hi + 1;
  }
  const json& parts = j.value("parts", json());
  if (!parts.is_object()) corrupt(path, "'parts' must be an object");
  for (const auto& [part, entry] : parts.items()) {
    if (part != "qkv" && part != "attn_out" && part != "fc1" && part != "fc2" && part != "head")
      corrupt(path, "unknown part '" + part + "' (expected qkv, attn_out, fc1, fc2 or head)");
    const json& choice = entry.is_object() ? entry.value("choice", json()) : json();
    if (!choice.is_array() || choice.size() != t.bucket_max.size())
      corrupt(path, "parts." + part + ".choice must list one of 'int', 'fp32', 'bf16' per bucket (" +
                        std::to_string(t.bucket_max.size()) + ")");
    LinearStrategy s;
    s.bucket_max = t.bucket_max;
    std::string alt;
    for (const json& c : choice) {
      const std::string v = c.is_string() ? c.get<std::string>() : "";
      if (v != "int" && v != "fp32" && v != "bf16")
        corrupt(path, "parts." + part + ".choice has '" + c.dump() + "' (expected 'int', 'fp32' or 'bf16')");
      if (v != "int" && !alt.empty() && v != alt)
        corrupt(path, "parts." + part + " mixes fp32 and bf16 (a Linear holds one alternative kernel)");
      if (v != "int") alt = v;
      s.use_alternative.push_back(v != "int");
    }
    s.precision = alt == "bf16" ? kernels::FloatPrecision::BF16 : kernels::FloatPrecision::F32;
    if (s.any()) t.parts[part] = s;
  }
  return t;
}

const LinearStrategy* StrategyTable::for_part(const std::string& part) const {
  auto it = parts.find(part);
  return it == parts.end() ? nullptr : &it->second;
}

std::string StrategyTable::describe() const {
  std::string out;
  for (const char* part : {"qkv", "attn_out", "fc1", "fc2", "head"}) {
    const LinearStrategy* s = for_part(part);
    out += std::string(part) + ":";
    int64_t lo = 1;
    for (size_t i = 0; i < bucket_max.size(); ++i) {
      const bool last = i + 1 == bucket_max.size();
      const std::string range = last ? std::to_string(lo) + "+"
                                : lo == bucket_max[i] ? std::to_string(lo)
                                                      : std::to_string(lo) + "-" + std::to_string(bucket_max[i]);
      out += std::string(i ? "," : "") + " M " + range + " " +
             (s && s->use_alternative[i] ? precision_name(s->precision) : "int");
      if (!last) lo = bucket_max[i] + 1;
    }
    out += "\n";
  }
  return out;
}

std::string machine_cpu_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon == std::string::npos) break;
      size_t start = line.find_first_not_of(" \t", colon + 1);
      return start == std::string::npos ? "unknown" : line.substr(start);
    }
  }
  return "unknown";
}

std::string machine_backend_name() { return kernels::backend_for(Device::cpu()).name(); }

}  // namespace finequant
