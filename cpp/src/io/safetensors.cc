// Safetensors reader: maps the file and validates every header field against the file size before
// any tensor byte is trusted. Layout: u64 little-endian header length N, N bytes of JSON, data.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <utility>
#include <vector>

#include "finequant/model_file.h"

namespace finequant {

namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // 100 MiB, as the safetensors library

[[noreturn]] void format_error(const std::string& path, const std::string& what) {
  fail(ErrorKind::ModelFormat, path + ": " + what);
}

bool parse_dtype(const std::string& s, DType* out) {
  static const std::pair<const char*, DType> kTable[] = {
      {"F32", DType::F32}, {"F16", DType::F16}, {"BF16", DType::BF16}, {"I8", DType::I8},
      {"U8", DType::U8},   {"I32", DType::I32}, {"I64", DType::I64}};
  for (const auto& [name, dt] : kTable)
    if (s == name) {
      *out = dt;
      return true;
    }
  return false;
}

// A read-only mapping of a whole file; unmapped when the last tensor borrowing it goes away.
struct Mapping {
  void* base = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (base) munmap(base, size);
  }
};

std::shared_ptr<Mapping> map_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) format_error(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    format_error(path, std::string("cannot stat: ") + std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    format_error(path, "not a regular file");
  }
  if (st.st_size < 8) {
    ::close(fd);
    format_error(path, "file of " + std::to_string(st.st_size) + " bytes is too short for a safetensors header");
  }
  auto m = std::make_shared<Mapping>();
  m->size = static_cast<size_t>(st.st_size);
  void* p = mmap(nullptr, m->size, PROT_READ, MAP_PRIVATE, fd, 0);
  int e = errno;
  ::close(fd);  // the mapping stays valid after close
  if (p == MAP_FAILED) format_error(path, std::string("cannot mmap: ") + std::strerror(e));
  m->base = p;
  return m;
}

struct Entry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin, end;
};

Entry parse_entry(const std::string& path, const std::string& name, const nlohmann::json& j, uint64_t data_size) {
  const std::string where = "tensor '" + name + "'";
  if (!j.is_object()) format_error(path, where + ": header entry is not an object");
  if (j.size() != 3 || !j.contains("dtype") || !j.contains("shape") || !j.contains("data_offsets"))
    format_error(path, where + ": header entry must have exactly dtype, shape and data_offsets");

  Entry e;
  e.name = name;
  const auto& jd = j["dtype"];
  if (!jd.is_string()) format_error(path, where + ": dtype is not a string");
  if (!parse_dtype(jd.get<std::string>(), &e.dtype))
    format_error(path, where + ": unsupported dtype '" + jd.get<std::string>() + "'");

  const auto& js = j["shape"];
  if (!js.is_array()) format_error(path, where + ": shape is not an array");
  uint64_t numel = 1;
  for (const auto& d : js) {
    if (!d.is_number_unsigned()) format_error(path, where + ": shape holds something other than a non-negative integer");
    uint64_t v = d.get<uint64_t>();
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
        (v != 0 && numel > std::numeric_limits<uint64_t>::max() / v))
      format_error(path, where + ": shape is too large");
    numel *= v;
    e.shape.push_back(static_cast<int64_t>(v));
  }
  const uint64_t esize = dtype_size(e.dtype);
  if (numel > std::numeric_limits<uint64_t>::max() / esize) format_error(path, where + ": shape is too large");

  const auto& jo = j["data_offsets"];
  if (!jo.is_array() || jo.size() != 2 || !jo[0].is_number_unsigned() || !jo[1].is_number_unsigned())
    format_error(path, where + ": data_offsets must be two non-negative integers");
  e.begin = jo[0].get<uint64_t>();
  e.end = jo[1].get<uint64_t>();
  if (e.begin > e.end) format_error(path, where + ": data_offsets begin > end");
  if (e.end > data_size)
    format_error(path, where + ": data_offsets end " + std::to_string(e.end) + " is past the " +
                           std::to_string(data_size) + " bytes of tensor data (truncated file?)");
  if (e.end - e.begin != numel * esize)
    format_error(path, where + ": " + std::to_string(e.end - e.begin) + " bytes of data for shape " +
                           shape_str(e.shape) + " of dtype " + dtype_name(e.dtype) + " (expected " +
                           std::to_string(numel * esize) + ")");
  return e;
}

}  // namespace

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<Mapping> map = map_file(path);
  const uint8_t* base = static_cast<const uint8_t*>(map->base);

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base[i];  // little-endian, any host
  if (header_len > map->size - 8)
    format_error(path, "header length " + std::to_string(header_len) + " exceeds the file size " +
                           std::to_string(map->size) + " (truncated file?)");
  if (header_len > kMaxHeaderBytes) format_error(path, "header length " + std::to_string(header_len) + " exceeds 100 MiB");

  const char* header = reinterpret_cast<const char*>(base + 8);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(header, header + header_len);
  } catch (const nlohmann::json::exception& e) {
    format_error(path, std::string("header is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) format_error(path, "header is not a JSON object");

  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = map->size - data_start;

  SafetensorsFile f;
  f.path_ = path;
  std::vector<Entry> entries;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) format_error(path, "__metadata__ is not an object");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) format_error(path, "__metadata__ value of '" + m.key() + "' is not a string");
        f.metadata_[m.key()] = m->get<std::string>();
      }
      continue;
    }
    entries.push_back(parse_entry(path, it.key(), *it, data_size));
  }

  // Byte ranges of different tensors must not overlap (empty ranges cannot).
  std::vector<const Entry*> order;
  for (const auto& e : entries)
    if (e.end > e.begin) order.push_back(&e);
  std::sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < order.size(); ++i) {
    if (order[i]->begin < order[i - 1]->end)
      format_error(path, "data of tensors '" + order[i - 1]->name + "' and '" + order[i]->name + "' overlap");
    if (order[i]->begin > order[i - 1]->end)  // the format requires the buffer to be entirely indexed
      format_error(path, std::to_string(order[i]->begin - order[i - 1]->end) + " bytes between the data of tensors '" +
                             order[i - 1]->name + "' and '" + order[i]->name + "' belong to no tensor");
  }
  if (!order.empty() && order.front()->begin != 0)
    format_error(path, std::to_string(order.front()->begin) + " bytes before the data of tensor '" +
                           order.front()->name + "' belong to no tensor");
  const uint64_t used = order.empty() ? 0 : order.back()->end;
  if (used != data_size)
    format_error(path, std::to_string(data_size - used) + " bytes after the last tensor's data belong to no tensor");

  std::shared_ptr<const void> keepalive(map, map->base);  // aliasing: tensors keep the mapping alive
  for (const auto& e : entries) {
    uint8_t* p = static_cast<uint8_t*>(map->base) + data_start + e.begin;
    // Read-only mapping: borrowed tensors must not be written to.
    Tensor t = Tensor::borrow(p, e.dtype, e.shape, keepalive);
    if ((data_start + e.begin) % dtype_size(e.dtype) != 0) t = t.clone();  // misaligned: own an aligned copy
    f.tensors_.emplace(e.name, std::move(t));
  }
  return f;
}

const Tensor& SafetensorsFile::tensor(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) format_error(path_, "missing tensor '" + name + "'");
  return it->second;
}

const std::string& SafetensorsFile::meta(const std::string& key) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end()) format_error(path_, "missing metadata key '" + key + "'");
  return it->second;
}

}  // namespace finequant
