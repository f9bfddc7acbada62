// Trace reader (memory-mapped, every header field validated before use) and streamed writer.
//
// File layout (safetensors): u64 little-endian header length N, N bytes of JSON, then the data.
// The JSON maps tensor name -> {"dtype", "shape", "data_offsets": [begin, end]} with offsets
// relative to the start of the data, plus "__metadata__": {string: string}.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kvrt_common/status_macros.h"
#include "nlohmann/json.hpp"
#include "tools/trace/trace.h"

namespace kvrt::trace {
namespace {

using json = nlohmann::json;

// NOTE: the header is JSON that we parse in memory; a larger one is not a trace but a corrupt or
// hostile file, and refusing it early keeps a bad length from turning into a huge allocation.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
constexpr int64_t kMaxHeads = 1 << 16;
constexpr int64_t kMaxHeadDim = 1 << 16;
constexpr int64_t kMaxLayers = 1 << 20;

// Metadata keys the format defines; any other __metadata__ entry goes to TraceMeta::extra.
const std::set<std::string>& ReservedKeys() {
  static const std::set<std::string> keys = {
      "format",   "format_version", "model",         "num_layers",   "num_q_heads", "num_kv_heads",
      "head_dim", "dtype",          "prompt_tokens", "decode_steps", "scale",       "post_rotary"};
  return keys;
}

std::string SafetensorsDType(DType t) {
  switch (t) {
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
  }
  return "?";
}

// Element size of every dtype safetensors defines (0 = unknown), so that tensors a recorder adds
// beyond the six per layer are still checked for size and overlap.
std::size_t SafetensorsElementSize(const std::string& name) {
  static const std::map<std::string, std::size_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"I64", 8}, {"U64", 8},     {"F64", 8}};
  auto it = sizes.find(name);
  return it == sizes.end() ? 0 : it->second;
}

bool ParseDTypeName(const std::string& s, DType* out) {
  if (s == "f32")
    *out = DType::kF32;
  else if (s == "f16")
    *out = DType::kF16;
  else if (s == "bf16")
    *out = DType::kBF16;
  else
    return false;
  return true;
}

bool MulOverflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}

std::string TensorName(int layer, const std::string& part) {
  return absl::StrCat(layer, ".", part);
}

// Rows, heads of a part, or -1 for an unknown part.
bool PartShape(const TraceMeta& m, const std::string& part, std::vector<int64_t>* shape) {
  const bool prefill = part.rfind("prefill.", 0) == 0;
  const bool decode = part.rfind("decode.", 0) == 0;
  if (!prefill && !decode) return false;
  const std::string which = part.substr(part.find('.') + 1);
  int64_t heads;
  if (which == "q")
    heads = m.num_q_heads;
  else if (which == "k" || which == "v")
    heads = m.num_kv_heads;
  else
    return false;
  *shape = {prefill ? m.prompt_tokens : m.decode_steps, heads, m.head_dim};
  return true;
}

}  // namespace

absl::Status ValidateTraceMeta(const TraceMeta& m, const std::string& where) {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", what));
  };
  if (m.num_layers <= 0 || m.num_layers > kMaxLayers)
    return bad(absl::StrCat("num_layers must be in [1, ", kMaxLayers, "], got ", m.num_layers));
  if (m.num_q_heads <= 0 || m.num_q_heads > kMaxHeads)
    return bad(absl::StrCat("num_q_heads must be in [1, ", kMaxHeads, "], got ", m.num_q_heads));
  if (m.num_kv_heads <= 0 || m.num_kv_heads > kMaxHeads)
    return bad(absl::StrCat("num_kv_heads must be in [1, ", kMaxHeads, "], got ", m.num_kv_heads));
  if (m.num_q_heads % m.num_kv_heads != 0)
    return bad(absl::StrCat("num_q_heads (", m.num_q_heads,
                            ") must be a multiple of num_kv_heads (", m.num_kv_heads, ")"));
  if (m.head_dim <= 0 || m.head_dim > kMaxHeadDim)
    return bad(absl::StrCat("head_dim must be in [1, ", kMaxHeadDim, "], got ", m.head_dim));
  if (m.prompt_tokens < 0) return bad(absl::StrCat("prompt_tokens is negative: ", m.prompt_tokens));
  if (m.decode_steps < 0) return bad(absl::StrCat("decode_steps is negative: ", m.decode_steps));
  if (!std::isfinite(m.scale) || m.scale < 0)
    return bad(absl::StrCat("scale must be finite and >= 0 (0 = 1/sqrt(head_dim)), got ", m.scale));
  if (!m.post_rotary)
    return bad(
        "post_rotary is false: kvrt attends with the keys and queries the model actually "
        "multiplies, so a trace must hold q and k after the rotary embedding");
  return absl::OkStatus();
}

namespace {

// Bytes of one tensor of the layer, with overflow checks (the sizes come from a file).
absl::StatusOr<uint64_t> TensorBytes(const std::vector<int64_t>& shape, std::size_t elem,
                                     const std::string& where) {
  uint64_t n = elem;
  for (int64_t dim : shape) {
    if (dim < 0 || MulOverflows(n, static_cast<uint64_t>(dim), &n))
      return absl::InvalidArgumentError(absl::StrCat(where, ": tensor size overflows (shape [",
                                                     absl::StrJoin(shape, ", "), "])"));
  }
  return n;
}

// ---------------------------------------------------------------------------------------------
// Reader

class MappedTraceReader final : public TraceReader {
 public:
  ~MappedTraceReader() override {
    if (map_ != nullptr && map_ != MAP_FAILED) munmap(map_, size_);
  }
  const TraceMeta& meta() const override { return meta_; }
  const std::string& path() const override { return path_; }
  absl::StatusOr<TensorView> Tensor(int layer, const std::string& part) const override {
    const std::string name = TensorName(layer, part);
    auto it = tensors_.find(name);
    if (it == tensors_.end())
      return absl::NotFoundError(absl::StrCat("trace ", path_, ": no tensor \"", name,
                                              "\" (layers 0..", meta_.num_layers - 1, ", parts ",
                                              absl::StrJoin(TensorParts(), ", "), ")"));
    return it->second;
  }

  absl::Status Load(const std::string& path);

 private:
  absl::Status Error(absl::StatusCode code, const std::string& what) const {
    return absl::Status(code, absl::StrCat("trace ", path_, ": ", what));
  }
  absl::Status Invalid(const std::string& what) const {
    return Error(absl::StatusCode::kInvalidArgument, what);
  }
  absl::Status ParseMeta(const json& md);

  std::string path_;
  void* map_ = nullptr;
  std::size_t size_ = 0;
  TraceMeta meta_;
  std::map<std::string, TensorView> tensors_;
};

absl::Status MappedTraceReader::ParseMeta(const json& md) {
  if (!md.is_object()) return Invalid("\"__metadata__\" is missing or not an object");
  std::map<std::string, std::string> kv;
  for (auto it = md.begin(); it != md.end(); ++it) {
    if (!it.value().is_string())
      return Invalid(absl::StrCat("metadata key \"", it.key(), "\" is not a string"));
    kv[it.key()] = it.value().get<std::string>();
  }
  auto get = [&](const std::string& key, std::string* out) -> absl::Status {
    auto it = kv.find(key);
    if (it == kv.end()) return Invalid(absl::StrCat("metadata key \"", key, "\" is missing"));
    *out = it->second;
    return absl::OkStatus();
  };
  auto get_int = [&](const std::string& key, int64_t lo, int64_t hi, int64_t* out) -> absl::Status {
    std::string s;
    KVRT_RETURN_IF_ERROR(get(key, &s));
    int64_t v;
    if (!absl::SimpleAtoi(s, &v))
      return Invalid(absl::StrCat("metadata key \"", key, "\" is not an integer: \"", s, "\""));
    if (v < lo || v > hi)
      return Invalid(absl::StrCat("metadata key \"", key, "\" = ", v, " is out of range [", lo,
                                  ", ", hi, "]"));
    *out = v;
    return absl::OkStatus();
  };

  if (auto it = kv.find("format"); it != kv.end() && it->second != kFormatName)
    return Invalid(absl::StrCat("metadata \"format\" is \"", it->second, "\", expected \"",
                                kFormatName, "\""));
  if (auto it = kv.find("format_version"); it != kv.end()) {
    int v = 0;
    if (!absl::SimpleAtoi(it->second, &v) || v != kFormatVersion)
      return Invalid(absl::StrCat("unsupported format_version \"", it->second,
                                  "\" (this build reads version ", kFormatVersion, ")"));
  }

  TraceMeta m;
  KVRT_RETURN_IF_ERROR(get("model", &m.model));
  int64_t v;
  KVRT_RETURN_IF_ERROR(get_int("num_layers", 1, kMaxLayers, &v));
  m.num_layers = static_cast<int>(v);
  KVRT_RETURN_IF_ERROR(get_int("num_q_heads", 1, kMaxHeads, &v));
  m.num_q_heads = static_cast<int>(v);
  KVRT_RETURN_IF_ERROR(get_int("num_kv_heads", 1, kMaxHeads, &v));
  m.num_kv_heads = static_cast<int>(v);
  KVRT_RETURN_IF_ERROR(get_int("head_dim", 1, kMaxHeadDim, &v));
  m.head_dim = static_cast<int>(v);
  constexpr int64_t kMaxTokens = int64_t{1} << 40;
  KVRT_RETURN_IF_ERROR(get_int("prompt_tokens", 0, kMaxTokens, &m.prompt_tokens));
  KVRT_RETURN_IF_ERROR(get_int("decode_steps", 0, kMaxTokens, &m.decode_steps));
  std::string s;
  KVRT_RETURN_IF_ERROR(get("dtype", &s));
  if (!ParseDTypeName(s, &m.dtype))
    return Invalid(absl::StrCat("metadata key \"dtype\" = \"", s, "\" is not f32, f16 or bf16"));
  KVRT_RETURN_IF_ERROR(get("scale", &s));
  if (!absl::SimpleAtof(s, &m.scale))
    return Invalid(absl::StrCat("metadata key \"scale\" is not a number: \"", s, "\""));
  KVRT_RETURN_IF_ERROR(get("post_rotary", &s));
  if (s == "true" || s == "True" || s == "1")
    m.post_rotary = true;
  else if (s == "false" || s == "False" || s == "0")
    m.post_rotary = false;
  else
    return Invalid(absl::StrCat("metadata key \"post_rotary\" is not true/false: \"", s, "\""));
  KVRT_RETURN_IF_ERROR(ValidateTraceMeta(m, absl::StrCat("trace ", path_, ": metadata")));
  for (auto& [key, value] : kv)
    if (ReservedKeys().count(key) == 0) m.extra[key] = value;
  meta_ = std::move(m);
  return absl::OkStatus();
}

absl::Status MappedTraceReader::Load(const std::string& path) {
  path_ = path;
  // O_NONBLOCK: opening a FIFO without a writer returns at once (then fails the regular-file
  // check below) instead of blocking until a writer comes; a regular file ignores the flag.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int err = errno;
    return Error(err == ENOENT ? absl::StatusCode::kNotFound : absl::StatusCode::kInvalidArgument,
                 absl::StrCat("cannot open: ", std::strerror(err)));
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return Invalid("not a regular file");
  }
  size_ = static_cast<std::size_t>(st.st_size);
  if (size_ < 8) {
    ::close(fd);
    return Error(absl::StatusCode::kDataLoss,
                 absl::StrCat("file too small (", size_,
                              " bytes); a safetensors file starts with an 8-byte header length"));
  }
  map_ = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    return Invalid(absl::StrCat("mmap failed: ", std::strerror(errno)));
  }
  const auto* bytes = static_cast<const unsigned char*>(map_);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = header_len << 8 | bytes[i];
  if (header_len > kMaxHeaderBytes)
    return Invalid(absl::StrCat("header length ", header_len, " is absurd (limit ", kMaxHeaderBytes,
                                " bytes): not a safetensors file or corrupt"));
  if (header_len > size_ - 8)
    return Error(absl::StatusCode::kDataLoss,
                 absl::StrCat("header length ", header_len, " runs past the end of the file (",
                              size_, " bytes): truncated?"));
  const char* hbegin = reinterpret_cast<const char*>(bytes + 8);
  json header = json::parse(hbegin, hbegin + header_len, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) return Invalid("header is not valid JSON");
  if (!header.is_object()) return Invalid("header JSON is not an object");

  auto md = header.find("__metadata__");
  if (md == header.end()) return Invalid("header has no \"__metadata__\" (not a kvrt trace)");
  KVRT_RETURN_IF_ERROR(ParseMeta(*md));

  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = size_ - data_start;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;  // [begin, end) of non-empty tensors
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") continue;
    const json& t = it.value();
    const std::string where = absl::StrCat("tensor \"", name, "\"");
    if (!t.is_object()) return Invalid(absl::StrCat(where, " is not an object"));
    auto dt = t.find("dtype");
    auto sh = t.find("shape");
    auto off = t.find("data_offsets");
    if (dt == t.end() || !dt->is_string())
      return Invalid(absl::StrCat(where, ": \"dtype\" missing or not a string"));
    if (sh == t.end() || !sh->is_array())
      return Invalid(absl::StrCat(where, ": \"shape\" missing or not an array"));
    if (off == t.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned())
      return Invalid(
          absl::StrCat(where, ": \"data_offsets\" missing or not two non-negative integers"));
    std::vector<int64_t> shape;
    for (const json& d : *sh) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > (uint64_t{1} << 62))
        return Invalid(absl::StrCat(where, ": shape entries must be non-negative integers"));
      shape.push_back(static_cast<int64_t>(d.get<uint64_t>()));
    }
    const std::string dtype = dt->get<std::string>();
    const std::size_t elem = SafetensorsElementSize(dtype);
    if (elem == 0) return Invalid(absl::StrCat(where, ": unknown dtype \"", dtype, "\""));
    const uint64_t begin = (*off)[0].get<uint64_t>();
    const uint64_t end = (*off)[1].get<uint64_t>();
    if (begin > end)
      return Invalid(absl::StrCat(where, ": data_offsets [", begin, ", ", end, "] are reversed"));
    if (end > data_size)
      return Error(
          absl::StatusCode::kDataLoss,
          absl::StrCat(where, ": data_offsets [", begin, ", ", end,
                       "] run past the end of the data (", data_size, " bytes): truncated file?"));
    KVRT_ASSIGN_OR_RETURN(const uint64_t expect,
                          TensorBytes(shape, elem, absl::StrCat("trace ", path_, ": ", where)));
    if (end - begin != expect)
      return Invalid(absl::StrCat(where, ": data_offsets span ", end - begin, " bytes but shape [",
                                  absl::StrJoin(shape, ", "), "] of ", dtype, " needs ", expect));
    if (end > begin) ranges.emplace_back(begin, end);

    // Is this one of the trace's own tensors? Then dtype and shape must match the metadata.
    const std::size_t dot = name.find('.');
    int layer = -1;
    std::vector<int64_t> want;
    if (dot != std::string::npos && absl::SimpleAtoi(name.substr(0, dot), &layer) && layer >= 0 &&
        layer < meta_.num_layers && TensorName(layer, name.substr(dot + 1)) == name &&
        PartShape(meta_, name.substr(dot + 1), &want)) {
      if (dtype != SafetensorsDType(meta_.dtype))
        return Invalid(absl::StrCat(where, ": dtype ", dtype, " does not match metadata dtype ",
                                    std::string(DTypeName(meta_.dtype))));
      if (shape != want)
        return Invalid(absl::StrCat(where, ": shape [", absl::StrJoin(shape, ", "),
                                    "] does not match the metadata, which implies [",
                                    absl::StrJoin(want, ", "), "]"));
      TensorView view;
      view.data = bytes + data_start + begin;
      view.dtype = meta_.dtype;
      view.shape = shape;
      view.bytes = static_cast<std::size_t>(expect);
      tensors_[TensorName(layer, name.substr(dot + 1))] = std::move(view);
    }
  }
  std::sort(ranges.begin(), ranges.end());
  for (std::size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second)
      return Invalid(absl::StrCat("tensor data ranges overlap: [", ranges[i - 1].first, ", ",
                                  ranges[i - 1].second, ") and [", ranges[i].first, ", ",
                                  ranges[i].second, ")"));
  for (int layer = 0; layer < meta_.num_layers; ++layer)
    for (const std::string& part : TensorParts())
      if (tensors_.count(TensorName(layer, part)) == 0)
        return Error(
            absl::StatusCode::kNotFound,
            absl::StrCat("tensor \"", TensorName(layer, part),
                         "\" is missing (metadata says num_layers = ", meta_.num_layers, ")"));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Writer

class StreamTraceWriter final : public TraceWriter {
 public:
  ~StreamTraceWriter() override {
    if (file_ != nullptr) {
      // NOTE: a writer dropped before a successful Close() leaves no half-written trace behind.
      std::fclose(file_);
      RemovePartial();
    }
  }

  absl::Status Open(const std::string& path, const TraceMeta& meta);
  absl::Status WriteTensor(int layer, const std::string& part, const void* data,
                           std::size_t bytes) override;
  absl::Status Close() override;

 private:
  absl::Status Fail(const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("trace ", path_, ": ", what));
  }
  absl::Status IoError(const std::string& what) {
    return absl::InternalError(
        absl::StrCat("trace ", path_, ": ", what, ": ", std::strerror(errno)));
  }

  // A failed or abandoned write removes what it left only where the path was a regular file or
  // nothing: never a symlink's name, a device node or a FIFO that `-o` named.
  void RemovePartial() const {
    if (remove_on_failure_) std::remove(path_.c_str());
  }

  std::string path_;
  std::FILE* file_ = nullptr;
  bool remove_on_failure_ = false;
  TraceMeta meta_;
  std::vector<std::pair<std::string, std::size_t>> expected_;  // name, bytes, in write order
  std::size_t next_ = 0;
};

absl::Status StreamTraceWriter::Open(const std::string& path, const TraceMeta& meta) {
  path_ = path;
  meta_ = meta;
  KVRT_RETURN_IF_ERROR(ValidateTraceMeta(meta, absl::StrCat("trace ", path, ": metadata")));
  json md = json::object();
  md["format"] = kFormatName;
  md["format_version"] = std::to_string(kFormatVersion);
  md["model"] = meta.model;
  md["num_layers"] = std::to_string(meta.num_layers);
  md["num_q_heads"] = std::to_string(meta.num_q_heads);
  md["num_kv_heads"] = std::to_string(meta.num_kv_heads);
  md["head_dim"] = std::to_string(meta.head_dim);
  md["dtype"] = std::string(DTypeName(meta.dtype));
  md["prompt_tokens"] = std::to_string(meta.prompt_tokens);
  md["decode_steps"] = std::to_string(meta.decode_steps);
  md["scale"] = absl::StrFormat("%.9g", meta.scale);  // %.9g round-trips every float
  md["post_rotary"] = meta.post_rotary ? "true" : "false";
  for (const auto& [key, value] : meta.extra) {
    if (ReservedKeys().count(key) != 0)
      return Fail(absl::StrCat("extra metadata key \"", key, "\" is reserved by the format"));
    md[key] = value;
  }
  json header = json::object();
  header["__metadata__"] = std::move(md);
  uint64_t offset = 0;
  for (int layer = 0; layer < meta.num_layers; ++layer) {
    for (const std::string& part : TensorParts()) {
      std::vector<int64_t> shape;
      PartShape(meta, part, &shape);
      KVRT_ASSIGN_OR_RETURN(const uint64_t bytes,
                            TensorBytes(shape, DTypeSize(meta.dtype), "trace " + path));
      const std::string name = TensorName(layer, part);
      header[name] = {{"dtype", SafetensorsDType(meta.dtype)},
                      {"shape", shape},
                      {"data_offsets", {offset, offset + bytes}}};
      offset += bytes;
      expected_.emplace_back(name, static_cast<std::size_t>(bytes));
    }
  }
  std::string text = header.dump(-1, ' ', false, json::error_handler_t::replace);
  // safetensors pads the header with spaces so the data starts 8-byte aligned.
  text.append((8 - text.size() % 8) % 8, ' ');
  struct stat before;
  remove_on_failure_ =
      lstat(path.c_str(), &before) != 0 ? errno == ENOENT : S_ISREG(before.st_mode);
  file_ = std::fopen(path.c_str(), "wb");
  if (file_ == nullptr) return IoError("cannot create");
  std::setvbuf(file_, nullptr, _IOFBF, 1 << 20);
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(uint64_t{text.size()} >> (8 * i));
  if (std::fwrite(len, 1, 8, file_) != 8 ||
      std::fwrite(text.data(), 1, text.size(), file_) != text.size())
    return IoError("write failed");
  return absl::OkStatus();
}

absl::Status StreamTraceWriter::WriteTensor(int layer, const std::string& part, const void* data,
                                            std::size_t bytes) {
  if (file_ == nullptr) return Fail("WriteTensor after Close or a failed write");
  const std::string name = TensorName(layer, part);
  if (next_ >= expected_.size())
    return Fail(absl::StrCat("tensor \"", name, "\" written but all tensors are already written"));
  const auto& [want_name, want_bytes] = expected_[next_];
  if (name != want_name)
    return Fail(absl::StrCat("tensor \"", name, "\" written out of order; expected \"", want_name,
                             "\" (layers in order, then ", absl::StrJoin(TensorParts(), ", "),
                             ")"));
  if (bytes != want_bytes)
    return Fail(
        absl::StrCat("tensor \"", name, "\" has ", bytes, " bytes; its shape needs ", want_bytes));
  if (bytes > 0 && std::fwrite(data, 1, bytes, file_) != bytes) {
    absl::Status s = IoError(absl::StrCat("writing tensor \"", name, "\" failed"));
    std::fclose(file_);
    file_ = nullptr;
    RemovePartial();
    return s;
  }
  ++next_;
  return absl::OkStatus();
}

absl::Status StreamTraceWriter::Close() {
  if (file_ == nullptr) return Fail("Close called twice or after a failed write");
  if (next_ != expected_.size())
    return Fail(absl::StrCat("closed with ", expected_.size() - next_,
                             " tensors not written (next: \"", expected_[next_].first, "\")"));
  std::FILE* f = file_;
  file_ = nullptr;
  const bool flushed = std::fflush(f) == 0;
  const bool closed = std::fclose(f) == 0;
  if (!flushed || !closed) {
    absl::Status s = IoError("flush/close failed");
    RemovePartial();
    return s;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<TraceReader>> TraceReader::Open(const std::string& path) {
  auto reader = std::make_unique<MappedTraceReader>();
  KVRT_RETURN_IF_ERROR(reader->Load(path));
  return std::unique_ptr<TraceReader>(std::move(reader));
}

absl::StatusOr<std::unique_ptr<TraceWriter>> TraceWriter::Create(const std::string& path,
                                                                 const TraceMeta& meta) {
  auto writer = std::make_unique<StreamTraceWriter>();
  KVRT_RETURN_IF_ERROR(writer->Open(path, meta));
  return std::unique_ptr<TraceWriter>(std::move(writer));
}

}  // namespace kvrt::trace
