// Trace reader/writer round trips, hostile files, and the generator's determinism and statistics.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "oneapi/tbb/global_control.h"
#include "tests/support/random_trace.h"
#include "tools/trace/trace.h"

namespace kvrt::trace {
namespace {

using json = nlohmann::json;

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir ? dir : "/tmp") + "/kvrt_test_trace_" + std::to_string(getpid()) + "_" +
         name + ".safetensors";
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteAll(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

TraceMeta SmallMeta(DType dtype) {
  TraceMeta m;
  m.model = "unit-test";
  m.num_layers = 2;
  m.num_q_heads = 4;
  m.num_kv_heads = 2;
  m.head_dim = 8;
  m.dtype = dtype;
  m.prompt_tokens = 5;
  m.decode_steps = 3;
  m.scale = 0.125f;
  m.extra = {{"seed", "42"}, {"source", "test"}};
  return m;
}

using testing::ShapeOf;
using testing::WriteRandomTrace;

// A file from a header and a data blob (safetensors framing, no validation).
std::string Frame(const json& header, const std::string& data) {
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(uint64_t{text.size()} >> (8 * i));
  return out + text + data;
}

// Splits a valid file into header JSON and data.
void Unframe(const std::string& file, json* header, std::string* data) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | static_cast<unsigned char>(file[i]);
  *header = json::parse(file.substr(8, n));
  *data = file.substr(8 + n);
}

class TraceFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = TempPath(::testing::UnitTest::GetInstance()->current_test_info()->name());
    WriteRandomTrace(path_, SmallMeta(DType::kF16));
    Unframe(ReadAll(path_), &header_, &data_);
  }
  void TearDown() override { std::remove(path_.c_str()); }

  // Writes header_/data_ and expects Open to fail with a message holding the path and `needle`.
  void ExpectError(const std::string& needle) {
    WriteAll(path_, Frame(header_, data_));
    auto r = TraceReader::Open(path_);
    ASSERT_FALSE(r.ok()) << "expected an error mentioning: " << needle;
    const std::string msg(r.status().message());
    EXPECT_NE(msg.find(path_), std::string::npos) << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
  }

  std::string path_;
  json header_;
  std::string data_;
};

// ---- round trips ----------------------------------------------------------------------------

class RoundTrip : public ::testing::TestWithParam<DType> {};

TEST_P(RoundTrip, BitExact_AndMetadata) {
  const std::string path = TempPath(std::string("rt_") + std::string(DTypeName(GetParam())));
  const TraceMeta m = SmallMeta(GetParam());
  const auto written = WriteRandomTrace(path, m);
  auto r = TraceReader::Open(path);
  ASSERT_TRUE(r.ok()) << r.status();
  const TraceMeta& got = (*r)->meta();
  EXPECT_EQ(got.model, m.model);
  EXPECT_EQ(got.num_layers, m.num_layers);
  EXPECT_EQ(got.num_q_heads, m.num_q_heads);
  EXPECT_EQ(got.num_kv_heads, m.num_kv_heads);
  EXPECT_EQ(got.head_dim, m.head_dim);
  EXPECT_EQ(got.dtype, m.dtype);
  EXPECT_EQ(got.prompt_tokens, m.prompt_tokens);
  EXPECT_EQ(got.decode_steps, m.decode_steps);
  EXPECT_EQ(got.scale, m.scale);
  EXPECT_TRUE(got.post_rotary);
  EXPECT_EQ(got.extra, m.extra);
  int i = 0;
  for (int layer = 0; layer < m.num_layers; ++layer)
    for (const std::string& part : TensorParts()) {
      auto t = (*r)->Tensor(layer, part);
      ASSERT_TRUE(t.ok()) << t.status();
      EXPECT_EQ(t->shape, ShapeOf(m, part));
      EXPECT_EQ(t->dtype, m.dtype);
      ASSERT_EQ(t->bytes, written[i].size());
      EXPECT_EQ(0, std::memcmp(t->data, written[i].data(), t->bytes)) << layer << "." << part;
      ++i;
    }
  EXPECT_FALSE((*r)->Tensor(2, "prefill.q").ok());
  EXPECT_FALSE((*r)->Tensor(0, "prefill.x").ok());
  // safetensors framing: 8-byte aligned data start, header padded with spaces.
  const std::string file = ReadAll(path);
  uint64_t n = 0;
  for (int b = 7; b >= 0; --b) n = n << 8 | static_cast<unsigned char>(file[b]);
  EXPECT_EQ(n % 8, 0u);
  std::remove(path.c_str());
}

INSTANTIATE_TEST_SUITE_P(AllDTypes, RoundTrip,
                         ::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

TEST(TraceWriter, RejectsOutOfOrderWrongSizeAndMissingTensors) {
  const std::string path = TempPath("writer_errors");
  const TraceMeta m = SmallMeta(DType::kF32);
  auto w = TraceWriter::Create(path, m);
  ASSERT_TRUE(w.ok());
  std::vector<char> buf(4096);
  auto s = (*w)->WriteTensor(0, "prefill.k", buf.data(), 5 * 2 * 8 * 4);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(std::string(s.message()).find("out of order"), std::string::npos) << s;
  s = (*w)->WriteTensor(0, "prefill.q", buf.data(), 7);
  EXPECT_NE(std::string(s.message()).find("bytes"), std::string::npos) << s;
  ASSERT_TRUE((*w)->WriteTensor(0, "prefill.q", buf.data(), 5 * 4 * 8 * 4).ok());
  s = (*w)->Close();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(std::string(s.message()).find("not written"), std::string::npos) << s;
  w->reset();
  EXPECT_FALSE(TraceReader::Open(path).ok());  // nothing half-written is left behind

  TraceMeta bad = m;
  bad.extra["dtype"] = "f32";
  EXPECT_FALSE(TraceWriter::Create(path, bad).ok());
  bad = m;
  bad.num_q_heads = 3;
  EXPECT_FALSE(TraceWriter::Create(path, bad).ok());
  bad = m;
  bad.post_rotary = false;
  EXPECT_FALSE(TraceWriter::Create(path, bad).ok());
  std::remove(path.c_str());
}

// ---- hostile files ----------------------------------------------------------------------------

TEST_F(TraceFileTest, ValidBaselineOpens) {
  WriteAll(path_, Frame(header_, data_));
  EXPECT_TRUE(TraceReader::Open(path_).ok());
}

TEST_F(TraceFileTest, TruncatedAtEveryLength_ErrorsNeverCrashes) {
  const std::string full = Frame(header_, data_);
  const std::size_t data_start = full.size() - data_.size();
  // Every length through the header and into the data, then a stride through the data; the
  // file shrinks in place (truncate(2)), which is much cheaper than rewriting it each time.
  WriteAll(path_, full);
  for (std::size_t len = full.size() - 1;; len -= len < data_start + 16 ? 1 : 29) {
    ASSERT_EQ(0, ::truncate(path_.c_str(), static_cast<off_t>(len)));
    auto r = TraceReader::Open(path_);
    ASSERT_FALSE(r.ok()) << "length " << len;
    EXPECT_NE(std::string(r.status().message()).find(path_), std::string::npos);
    if (len == 0) break;
  }
  WriteAll(path_, full.substr(0, 3));
  auto r = TraceReader::Open(path_);
  EXPECT_NE(std::string(r.status().message()).find("too small"), std::string::npos);
  WriteAll(path_, full.substr(0, full.size() - 1));
  r = TraceReader::Open(path_);
  EXPECT_NE(std::string(r.status().message()).find("past the end"), std::string::npos)
      << r.status();
}

TEST_F(TraceFileTest, MissingFile) {
  auto r = TraceReader::Open(path_ + ".does-not-exist");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
}

TEST_F(TraceFileTest, HugeHeaderLength) {
  std::string file = Frame(header_, data_);
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>(0xff);
  WriteAll(path_, file);
  auto r = TraceReader::Open(path_);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(std::string(r.status().message()).find("absurd"), std::string::npos) << r.status();
  // Plausible but beyond the file.
  uint64_t n = file.size() + 100;
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>(n >> (8 * i));
  WriteAll(path_, file);
  r = TraceReader::Open(path_);
  EXPECT_NE(std::string(r.status().message()).find("past the end of the file"), std::string::npos);
}

TEST_F(TraceFileTest, BadJson) {
  std::string file = Frame(header_, data_);
  file[8] = '[';
  file[9] = '{';
  WriteAll(path_, file);
  auto r = TraceReader::Open(path_);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(std::string(r.status().message()).find("JSON"), std::string::npos) << r.status();
}

TEST_F(TraceFileTest, HeaderNotAnObject) {
  WriteAll(path_, Frame(json::array({1, 2}), data_));
  auto r = TraceReader::Open(path_);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(std::string(r.status().message()).find("not an object"), std::string::npos);
}

TEST_F(TraceFileTest, MissingMetadataKey_NamesIt) {
  const json original = header_;
  for (const char* key : {"model", "num_layers", "num_q_heads", "num_kv_heads", "head_dim", "dtype",
                          "prompt_tokens", "decode_steps", "scale", "post_rotary"}) {
    header_ = original;
    header_["__metadata__"].erase(key);
    ExpectError(std::string("\"") + key + "\" is missing");
  }
  header_ = original;
  header_.erase("__metadata__");
  ExpectError("__metadata__");
}

TEST_F(TraceFileTest, IllTypedMetadata) {
  const json original = header_;
  header_["__metadata__"]["num_layers"] = "two";
  ExpectError("\"num_layers\" is not an integer");
  header_ = original;
  header_["__metadata__"]["head_dim"] = 8;  // a number, not a string
  ExpectError("\"head_dim\" is not a string");
  header_ = original;
  header_["__metadata__"]["num_q_heads"] = "3";
  ExpectError("multiple of num_kv_heads");
  header_ = original;
  header_["__metadata__"]["num_kv_heads"] = "-2";
  ExpectError("out of range");
  header_ = original;
  header_["__metadata__"]["dtype"] = "f64";
  ExpectError("\"dtype\" = \"f64\"");
  header_ = original;
  header_["__metadata__"]["post_rotary"] = "false";
  ExpectError("after the rotary embedding");
  header_ = original;
  header_["__metadata__"]["format"] = "something-else";
  ExpectError("\"format\"");
  header_ = original;
  header_["__metadata__"]["format_version"] = "2";
  ExpectError("format_version");
}

TEST_F(TraceFileTest, FormatKeysOptional_AnyTensorOrder) {
  // As Python's safetensors.numpy.save_file writes it: no format keys, data in another order.
  header_["__metadata__"].erase("format");
  header_["__metadata__"].erase("format_version");
  std::vector<std::pair<std::string, json>> tensors;
  for (auto it = header_.begin(); it != header_.end(); ++it)
    if (it.key() != "__metadata__") tensors.emplace_back(it.key(), it.value());
  std::string reordered;
  for (auto it = tensors.rbegin(); it != tensors.rend(); ++it) {
    const uint64_t b = it->second["data_offsets"][0], e = it->second["data_offsets"][1];
    const uint64_t nb = reordered.size();
    reordered += data_.substr(b, e - b);
    header_[it->first]["data_offsets"] = {nb, nb + (e - b)};
  }
  const std::string original_data = data_;
  data_ = reordered;
  WriteAll(path_, Frame(header_, data_));
  auto r = TraceReader::Open(path_);
  ASSERT_TRUE(r.ok()) << r.status();
  auto t = (*r)->Tensor(1, "decode.v");
  ASSERT_TRUE(t.ok());
  json original_entry;
  for (auto& [name, entry] : tensors)
    if (name == "1.decode.v") original_entry = entry;
  const uint64_t b = original_entry["data_offsets"][0];
  EXPECT_EQ(0, std::memcmp(t->data, original_data.data() + b, t->bytes));
}

TEST_F(TraceFileTest, WrongTensorDType) {
  header_["0.prefill.k"]["dtype"] = "BF16";
  ExpectError("does not match metadata dtype");
  header_["0.prefill.k"]["dtype"] = "Q4";
  ExpectError("unknown dtype \"Q4\"");
  header_["0.prefill.k"]["dtype"] = 3;
  ExpectError("\"dtype\" missing or not a string");
}

TEST_F(TraceFileTest, WrongShape) {
  header_["1.decode.q"]["shape"] = {3, 2, 16};  // same bytes, wrong shape
  ExpectError("does not match the metadata");
  header_["1.decode.q"]["shape"] = {3, -4, 8};
  ExpectError("non-negative integers");
  header_["1.decode.q"]["shape"] = "3x4x8";
  ExpectError("\"shape\" missing");
}

TEST_F(TraceFileTest, SizeMismatchAndOverflow) {
  auto& off = header_["0.decode.v"]["data_offsets"];
  off[1] = off[1].get<uint64_t>() - 2;
  ExpectError("needs");
  SetUp();
  header_["0.decode.v"]["shape"] = {uint64_t{1} << 40, uint64_t{1} << 40, 8};
  ExpectError("overflows");
}

TEST_F(TraceFileTest, OffsetsBeyondFile) {
  const uint64_t size = data_.size();
  header_["1.decode.v"]["data_offsets"] = {size, size + 3 * 2 * 8 * 2};
  ExpectError("past the end of the data");
  header_["1.decode.v"]["data_offsets"] = {uint64_t{1} << 63, uint64_t{1} << 62};
  ExpectError("reversed");
  header_["1.decode.v"]["data_offsets"] = {0};
  ExpectError("data_offsets");
  header_["1.decode.v"]["data_offsets"] = {-1, 5};
  ExpectError("data_offsets");
}

TEST_F(TraceFileTest, OverlappingOffsets) {
  header_["1.decode.v"]["data_offsets"] = header_["1.decode.k"]["data_offsets"];
  ExpectError("overlap");
}

TEST_F(TraceFileTest, MissingTensor) {
  header_.erase("1.prefill.v");
  ExpectError("\"1.prefill.v\" is missing");
  SetUp();
  header_["__metadata__"]["num_layers"] = "3";
  ExpectError("\"2.prefill.q\" is missing");
}

TEST_F(TraceFileTest, ExtraTensorsAreAllowedButChecked) {
  header_["note"] = {
      {"dtype", "U8"}, {"shape", {4}}, {"data_offsets", {data_.size(), data_.size() + 4}}};
  data_ += "abcd";
  WriteAll(path_, Frame(header_, data_));
  EXPECT_TRUE(TraceReader::Open(path_).ok());
  header_["note"]["data_offsets"] = {0, 4};
  ExpectError("overlap");
}

TEST_F(TraceFileTest, RandomByteCorruption_NeverCrashes) {
  const std::string full = Frame(header_, data_);
  std::mt19937 rng(3);
  // Flip bytes in place (pwrite) and restore them, instead of rewriting the file each round.
  WriteAll(path_, full);
  const int fd = ::open(path_.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  for (int i = 0; i < 300; ++i) {
    std::vector<std::size_t> at;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int j = 0; j < flips; ++j) {
      at.push_back(rng() % std::min<std::size_t>(full.size(), 600));
      const char c = static_cast<char>(full[at.back()] ^ (1 << (rng() % 8)));
      ASSERT_EQ(1, ::pwrite(fd, &c, 1, static_cast<off_t>(at.back())));
    }
    auto r = TraceReader::Open(path_);
    if (!r.ok()) {
      EXPECT_NE(std::string(r.status().message()).find(path_), std::string::npos);
    }
    for (std::size_t pos : at) ASSERT_EQ(1, ::pwrite(fd, &full[pos], 1, static_cast<off_t>(pos)));
  }
  ::close(fd);
}

// ---- generator --------------------------------------------------------------------------------

GenOptions SmallGen(uint64_t seed) {
  GenOptions o;
  o.meta.num_layers = 2;
  o.meta.num_q_heads = 4;
  o.meta.num_kv_heads = 2;
  o.meta.head_dim = 32;
  o.meta.prompt_tokens = 3000;  // more than one chunk of positions
  o.meta.decode_steps = 8;
  o.seed = seed;
  o.needles = 4;
  o.show_progress = false;
  return o;
}

TEST(GenerateTrace, DeterministicForSeed_IndependentOfThreads) {
  const std::string a = TempPath("gen_a"), b = TempPath("gen_b"), c = TempPath("gen_c");
  ASSERT_TRUE(GenerateTrace(a, SmallGen(5)).ok());
  {
    tbb::global_control one(tbb::global_control::max_allowed_parallelism, 1);
    ASSERT_TRUE(GenerateTrace(b, SmallGen(5)).ok());
  }
  ASSERT_TRUE(GenerateTrace(c, SmallGen(6)).ok());
  const std::string fa = ReadAll(a), fb = ReadAll(b), fc = ReadAll(c);
  EXPECT_GT(fa.size(), 100000u);
  EXPECT_TRUE(fa == fb) << "same seed gave different bytes";
  EXPECT_EQ(fa.size(), fc.size());
  EXPECT_FALSE(fa == fc) << "different seeds gave the same bytes";
  auto r = TraceReader::Open(a);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)->meta().extra.at("seed"), "5");
  EXPECT_NEAR((*r)->meta().scale, 1.0 / std::sqrt(32.0), 1e-7);
  for (const std::string& p : {a, b, c}) std::remove(p.c_str());
}

TEST(GenerateTrace, RejectsBadShapes) {
  GenOptions o = SmallGen(1);
  o.meta.num_q_heads = 3;
  const std::string path = TempPath("gen_bad");
  auto s = GenerateTrace(path, o);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(std::string(s.message()).find("multiple of num_kv_heads"), std::string::npos) << s;
  o = SmallGen(1);
  o.meta.head_dim = 0;
  EXPECT_FALSE(GenerateTrace(path, o).ok());
  o = SmallGen(1);
  o.needles = -1;
  EXPECT_FALSE(GenerateTrace(path, o).ok());
}

// The properties docs/traces.md promises, measured on a small trace (the 32K numbers are in the
// doc; these bounds are loose enough for 4K tokens and d=64).
TEST(GenerateTrace, AttentionIsPeakedButNotOneHot) {
  GenOptions o = SmallGen(11);
  o.meta.num_layers = 1;
  o.meta.head_dim = 64;
  o.meta.num_q_heads = 8;
  o.meta.prompt_tokens = 4096;
  o.meta.decode_steps = 24;
  o.needles = 8;
  const std::string path = TempPath("gen_stats");
  ASSERT_TRUE(GenerateTrace(path, o).ok());
  auto r = TraceReader::Open(path);
  ASSERT_TRUE(r.ok());
  AttentionStatsOptions so;
  so.max_steps = 24;
  so.ivf_probe_fraction = 0.05;
  auto st = ComputeAttentionStats(**r, so);
  ASSERT_TRUE(st.ok()) << st.status();
  std::printf(
      "top100 %.3f sink %.3f window %.3f cold %.3f span %.3f max %.3f sharp %.3f ivf %.3f\n",
      st->top_k_mass, st->sink_mass, st->window_mass, st->top_k_cold_share, st->top_k_span,
      st->max_weight, st->sharp_share, st->ivf_recall);
  EXPECT_GT(st->top_k_mass, 0.5);
  EXPECT_LT(st->top_k_mass, 0.97);
  EXPECT_GT(st->sink_mass, 0.03);
  EXPECT_LT(st->sink_mass, 0.4);
  EXPECT_GT(st->window_mass, 0.02);
  EXPECT_GT(st->top_k_cold_share, 0.3);  // not only recent keys
  EXPECT_GT(st->sharp_share, 0.1);       // needle queries
  EXPECT_LT(st->ivf_recall, 0.6);        // a key-only index misses what queries want
  std::remove(path.c_str());
}

}  // namespace
}  // namespace kvrt::trace
