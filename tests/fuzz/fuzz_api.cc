// libFuzzer target: random sequences of C API calls on small shapes, checked against a model.
//
// The input is a tiny program: a few bytes choose the config, then each op is one byte (which
// call) followed by its arguments. The model keeps every token each (sequence, layer) holds, in
// f32 as rounded to the config's dtype, and checks after each call:
//   - the status is the one the model expects (invalid layer, unknown sequence, empty layer, ...);
//   - a failed call changed nothing (kvrt_seq_length unchanged);
//   - kvrt_seq_length and kvrt_get_stats (sequences, gpu_tokens, host_tokens) match the model;
//   - in EXACT mode (and FLAT when top_k covers every cold token) kvrt_attend equals a naive f64
//     attention over every token: ||o - ref|| <= 1e-4 * ||sum_i w_i |v_i|||, i.e. relative to
//     the magnitude the rounding error scales with (a plain ||ref|| can be ~0 by cancellation);
//   - other kinds: every output finite;
//   - kvrt_get_attended: in EXACT mode every position exactly once.
// Any mismatch aborts with a message (a libFuzzer crash).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <vector>

#include "kvrt.h"
#include "kvrt_common/dtype.h"

namespace {

[[noreturn]] void Die(const char* what, long long a = 0, long long b = 0) {
  std::fprintf(stderr, "fuzz_api: %s (%lld vs %lld); last error: %s\n", what, a, b,
               kvrt_last_error());
  std::abort();
}

class Input {
 public:
  Input(const uint8_t* d, size_t n) : d_(d), n_(n) {}
  bool empty() const { return i_ >= n_; }
  uint8_t u8() { return i_ < n_ ? d_[i_++] : 0; }
  int range(int lo, int hi) { return lo + u8() % (hi - lo + 1); }  // [lo, hi]
  uint32_t u32() { return u8() | u8() << 8 | u8() << 16 | static_cast<uint32_t>(u8()) << 24; }

 private:
  const uint8_t* d_;
  size_t n_, i_ = 0;
};

// Deterministic values in [-amp, amp] from a seed (the input gives the seed, not every float:
// keeps inputs short and values well-behaved).
struct Rng {
  uint64_t s;
  float next(float amp) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return amp * (static_cast<float>((s >> 40) & 0xffffff) / 8388608.f - 1.f);
  }
};

struct LayerModel {
  std::vector<float> k, v;  // [length, kv_heads, d] as stored (rounded to dtype)
  int64_t length = 0;
  bool attended = false;  // a successful attend happened since the last change
};

struct Model {
  kvrt_config c;
  std::map<kvrt_seq_id, std::vector<LayerModel>> seqs;
  std::vector<kvrt_seq_id> released;
  int64_t total_tokens = 0;
  int64_t gpu_tokens(int64_t len) const {
    return std::min<int64_t>(len, int64_t{c.sink_tokens} + c.window_tokens);
  }
};

constexpr int64_t kMaxTotalTokens = 4096;  // per input, keeps each run fast

// Tensor of n rows x heads x d in the config dtype, plus its f32 rounding.
void MakeTensor(const kvrt_config& c, int64_t n, int heads, Rng* rng, float amp,
                std::vector<unsigned char>* raw, std::vector<float>* rounded) {
  const size_t count = static_cast<size_t>(n) * heads * c.head_dim;
  std::vector<float> f(count);
  for (auto& x : f) x = rng->next(amp);
  const auto t = static_cast<kvrt::DType>(c.dtype);
  raw->resize(count * kvrt::DTypeSize(t));
  kvrt::ConvertFromF32(f.data(), count, t, raw->data());
  rounded->resize(count);
  kvrt::ConvertToF32(raw->data(), t, count, rounded->data());
}

bool CanCompareExactly(const Model& m, int64_t length) {
  if (m.c.index_kind == KVRT_INDEX_EXACT) return true;
  // FLAT retrieves the exact top-k: with k >= every cold token it attends to all of them.
  const int64_t cold = std::max<int64_t>(0, length - m.c.sink_tokens - m.c.window_tokens);
  return m.c.index_kind == KVRT_INDEX_FLAT && m.c.top_k >= cold;
}

void CheckAttention(const Model& m, const LayerModel& lm, const std::vector<float>& q,
                    const std::vector<float>& out) {
  const int H = m.c.num_q_heads, G = m.c.num_kv_heads, d = m.c.head_dim;
  const int group = H / G;
  kvrt_config eff;
  const double scale = m.c.scale != 0.f ? m.c.scale : 1.0 / std::sqrt(static_cast<double>(d));
  (void)eff;
  for (int h = 0; h < H; ++h) {
    const int g = h / group;
    std::vector<double> s(lm.length);
    double mx = -INFINITY;
    for (int64_t t = 0; t < lm.length; ++t) {
      double acc = 0;
      for (int i = 0; i < d; ++i)
        acc += static_cast<double>(q[static_cast<size_t>(h) * d + i]) *
               lm.k[(static_cast<size_t>(t) * G + g) * d + i];
      s[t] = acc * scale;
      mx = std::max(mx, s[t]);
    }
    double l = 0;
    for (auto& x : s) l += (x = std::exp(x - mx));
    double err2 = 0, mag2 = 0;
    for (int i = 0; i < d; ++i) {
      double ref = 0, mag = 0;
      for (int64_t t = 0; t < lm.length; ++t) {
        const double vv = lm.v[(static_cast<size_t>(t) * G + g) * d + i];
        ref += s[t] / l * vv;
        mag += s[t] / l * std::fabs(vv);
      }
      const double o = out[static_cast<size_t>(h) * d + i];
      if (!std::isfinite(o)) Die("attend output not finite", h, i);
      err2 += (o - ref) * (o - ref);
      mag2 += mag * mag;
    }
    if (std::sqrt(err2) > 1e-4 * std::sqrt(mag2) + 1e-30)
      Die("attend differs from exact attention (err/mag * 1e6, head)",
          static_cast<long long>(1e6 * std::sqrt(err2) / std::sqrt(mag2 + 1e-300)), h);
  }
}

void CheckCounts(kvrt_runtime* rt, const Model& m) {
  kvrt_stats st = kvrt_stats_init();
  if (kvrt_get_stats(rt, &st) != KVRT_OK) Die("get_stats failed");
  int64_t gpu = 0, host = 0;
  for (const auto& [id, layers] : m.seqs) {
    for (int l = 0; l < m.c.num_layers; ++l) {
      const int64_t len = layers[l].length;
      gpu += m.gpu_tokens(len);
      host += len - m.gpu_tokens(len);
      int64_t got = -1;
      if (kvrt_seq_length(rt, id, l, &got) != KVRT_OK) Die("seq_length failed", id, l);
      if (got != len) Die("seq_length differs from the model", got, len);
    }
  }
  if (st.sequences != static_cast<int64_t>(m.seqs.size()))
    Die("stats.sequences", st.sequences, static_cast<long long>(m.seqs.size()));
  if (st.gpu_tokens != gpu) Die("stats.gpu_tokens", st.gpu_tokens, gpu);
  if (st.host_tokens != host) Die("stats.host_tokens", st.host_tokens, host);
  if (st.gpu_tokens + st.host_tokens != m.total_tokens)
    Die("gpu_tokens + host_tokens != tokens held", st.gpu_tokens + st.host_tokens, m.total_tokens);
}

void Expect(kvrt_status got, kvrt_status want, const char* what) {
  if (got != want) {
    std::fprintf(stderr, "fuzz_api: %s returned %s, model expects %s\n", what,
                 kvrt_status_string(got), kvrt_status_string(want));
    Die(what, got, want);
  }
  if (got != KVRT_OK && kvrt_last_error()[0] == '\0') Die("failed call left no message");
}

// Fully arbitrary config fields: create must succeed or fail cleanly, never crash.
void FuzzCreateOnly(Input& in) {
  kvrt_config c = kvrt_config_default();
  int32_t* fields[] = {&c.num_layers,      &c.num_q_heads,   &c.num_kv_heads, &c.head_dim,
                       &c.sink_tokens,     &c.window_tokens, &c.top_k,        &c.search_effort,
                       &c.record_attended, &c.use_gpu,       &c.check_finite};
  for (auto* f : fields)
    if (in.u8() & 1) *f = static_cast<int32_t>(in.u32());
  if (in.u8() & 1) c.dtype = static_cast<kvrt_dtype>(static_cast<int32_t>(in.u32()));
  if (in.u8() & 1) c.index_kind = static_cast<kvrt_index_kind>(static_cast<int32_t>(in.u32()));
  if (in.u8() & 1) {
    uint32_t bits = in.u32();
    std::memcpy(&c.scale, &bits, 4);
  }
  if (in.u8() & 1) c.group_search = static_cast<int32_t>(in.u32());
  if (in.u8() & 1)
    c.cold_attention = static_cast<kvrt_cold_attention>(static_cast<int32_t>(in.u32()));
  c.worker_threads = in.range(0, 4);  // real threads: keep few
  if (in.u8() & 1) c.host_memory_limit = static_cast<int64_t>(in.u32()) * (in.u8() & 1 ? -1 : 1);
  kvrt_runtime* rt = reinterpret_cast<kvrt_runtime*>(0x10);
  const kvrt_status s = kvrt_runtime_create(&c, &rt);
  if (s == KVRT_OK) {
    kvrt_config eff = kvrt_config_default();
    if (kvrt_runtime_config(rt, &eff) != KVRT_OK) Die("runtime_config failed");
    kvrt_runtime_destroy(rt);
  } else {
    if (rt != reinterpret_cast<kvrt_runtime*>(0x10)) Die("create wrote *out on failure");
    if (s != KVRT_ERR_INVALID_ARGUMENT && s != KVRT_ERR_UNIMPLEMENTED) Die("create status", s);
    if (kvrt_last_error()[0] == '\0') Die("create failed without a message");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Input in(data, size);
  const uint8_t mode = in.u8();
  if (mode >= 0xf0) {
    FuzzCreateOnly(in);
    return 0;
  }
  Model m;
  kvrt_config& c = m.c;
  c = kvrt_config_default();
  c.num_layers = in.range(1, 2);
  c.num_kv_heads = in.range(1, 2);
  c.num_q_heads = c.num_kv_heads * in.range(1, 3);
  c.head_dim = in.range(1, 8);
  c.dtype = static_cast<kvrt_dtype>(in.range(0, 2));
  c.scale = (in.u8() & 3) == 0 ? 0.5f : 0.f;
  c.sink_tokens = in.range(0, 3);
  c.window_tokens = in.range(1, 6);
  c.top_k = in.range(1, 8);
  const uint8_t kind_byte = in.u8();
  const uint8_t kind = kind_byte % 8;  // EXACT and FLAT most of the time
  // NOTE: from bits of the same byte, so the committed corpus decodes as before this field.
  c.group_search = (kind_byte >> 3) & 1;
  c.index_kind = kind < 4   ? KVRT_INDEX_EXACT
                 : kind < 6 ? KVRT_INDEX_FLAT
                            : static_cast<kvrt_index_kind>(in.range(2, 5));
  c.worker_threads = 1;
  c.record_attended = in.u8() & 1;
  c.check_finite = in.u8() & 1;
  const uint8_t limits = in.u8();
  const int64_t token_bytes =
      2 * int64_t{c.num_kv_heads} * c.head_dim *
      static_cast<int64_t>(kvrt::DTypeSize(static_cast<kvrt::DType>(c.dtype)));
  if (limits & 1) c.gpu_memory_limit = token_bytes * in.range(1, 40);
  if (limits & 2) c.host_memory_limit = token_bytes * in.range(1, 200);
  const bool limited = (limits & 3) != 0;
  const float amp = (in.u8() & 1) ? 4.f : 1.f;

  kvrt_runtime* rt = nullptr;
  if (kvrt_runtime_create(&c, &rt) != KVRT_OK) Die("create with a valid config failed");
  Rng rng{in.u32()};
  std::vector<kvrt_seq_id> ids;  // live ids, in creation order (index into them from input)

  auto pick_seq = [&](uint8_t b, bool* live) -> kvrt_seq_id {
    if (!ids.empty() && b < 200) {
      *live = true;
      return ids[b % ids.size()];
    }
    *live = false;
    if (!m.released.empty() && b < 240) return m.released[b % m.released.size()];
    return 1000000 + b;  // never created
  };
  auto pick_layer = [&](uint8_t b, bool* ok) -> int32_t {
    const int32_t l = b < 240 ? b % c.num_layers : (b & 1 ? -1 : c.num_layers);
    *ok = l >= 0 && l < c.num_layers;
    return l;
  };

  int steps = 0;
  while (!in.empty() && steps++ < 64) {
    const uint8_t op = in.u8() % 10;
    switch (op) {
      case 0: {  // create
        if (m.seqs.size() >= 4) break;
        kvrt_seq_id id;
        Expect(kvrt_seq_create(rt, &id), KVRT_OK, "seq_create");
        if (m.seqs.count(id) != 0) Die("seq id reused", id);
        for (auto r : m.released)
          if (r == id) Die("released seq id reused", id);
        m.seqs[id].resize(c.num_layers);
        ids.push_back(id);
        break;
      }
      case 1: {  // release
        bool live;
        const kvrt_seq_id id = pick_seq(in.u8(), &live);
        Expect(kvrt_seq_release(rt, id), live ? KVRT_OK : KVRT_ERR_NOT_FOUND, "seq_release");
        if (live) {
          for (auto& lm : m.seqs[id]) m.total_tokens -= lm.length;
          m.seqs.erase(id);
          ids.erase(std::find(ids.begin(), ids.end(), id));
          m.released.push_back(id);
        }
        break;
      }
      case 2:    // prefill
      case 3:    // append
      case 4: {  // append one token (the decode step's usual call)
        bool live, layer_ok;
        const kvrt_seq_id id = pick_seq(in.u8(), &live);
        const int32_t layer = pick_layer(in.u8(), &layer_ok);
        const uint8_t nb = in.u8();
        int64_t n = op == 4 ? 1 : (nb < 250 ? 1 + nb % (op == 2 ? 64 : 16) : -(nb % 3));
        const uint8_t flags = in.u8();
        const bool with_q = op == 2 && (flags & 1);
        // A prefill from some of the prompt's queries (kvrt_prefill_sampled_ex): n_queries in
        // [0, rows + 1], rows + 1 being one past the prompt (refused), q NULL or not.
        const uint8_t qsel = op == 2 ? in.u8() : 0;
        const bool sampled = (qsel & 0x80) != 0;
        const bool nan = c.check_finite && (flags & 0x70) == 0x70;
        const bool null_kv = (flags & 0x8c) == 0x8c;
        if (m.total_tokens + std::max<int64_t>(n, 0) > kMaxTotalTokens) n = 1;
        std::vector<unsigned char> kraw, vraw, qraw;
        std::vector<float> kf, vf, qf;
        const int64_t rows = std::max<int64_t>(n, 1);
        MakeTensor(c, rows, c.num_kv_heads, &rng, amp, &kraw, &kf);
        MakeTensor(c, rows, c.num_kv_heads, &rng, amp, &vraw, &vf);
        if (with_q) MakeTensor(c, rows + (sampled ? 1 : 0), c.num_q_heads, &rng, amp, &qraw, &qf);
        const int64_t n_queries = !sampled ? (with_q ? n : 0) : (qsel & 0x7f) % (rows + 2);
        const bool bad_queries =
            sampled && (n_queries > std::max<int64_t>(n, 0) || (n_queries > 0 && !with_q));
        bool nan_read = nan;  // the non-finite value is in what the call reads
        if (nan) {            // one non-finite value in k, v or q
          const size_t es = kvrt::DTypeSize(static_cast<kvrt::DType>(c.dtype));
          auto& victim = (flags & 2) ? vraw : (with_q && (flags & 8) ? qraw : kraw);
          const float bad = (flags & 4) ? NAN : -INFINITY;
          const size_t at = rng.s % (victim.size() / es);
          kvrt::ConvertFromF32(&bad, 1, static_cast<kvrt::DType>(c.dtype), victim.data() + at * es);
          if (&victim == &qraw)
            nan_read = static_cast<int64_t>(at / (c.num_q_heads * c.head_dim)) < n_queries;
        }
        LayerModel* lm = live && layer_ok ? &m.seqs[id][layer] : nullptr;
        const int64_t before = lm ? lm->length : 0;
        kvrt_status want = KVRT_OK;
        if (null_kv)
          want = KVRT_ERR_INVALID_ARGUMENT;
        else if (!layer_ok)
          want = KVRT_ERR_INVALID_ARGUMENT;
        else if (!live)
          want = KVRT_ERR_NOT_FOUND;
        else if (n < 1 || bad_queries)
          want = KVRT_ERR_INVALID_ARGUMENT;
        else if (nan_read)
          want = KVRT_ERR_INVALID_ARGUMENT;
        else if (op == 2 && before != 0)
          want = KVRT_ERR_FAILED_PRECONDITION;
        const void* kp = null_kv ? nullptr : kraw.data();
        const kvrt_status got =
            op != 2 ? kvrt_append(rt, id, layer, kp, vraw.data(), n)
            : sampled
                ? kvrt_prefill_sampled_ex(rt, id, layer, with_q ? qraw.data() : nullptr, n_queries,
                                          kp, vraw.data(), n, nullptr)
                : kvrt_prefill(rt, id, layer, with_q ? qraw.data() : nullptr, kp, vraw.data(), n);
        // Budgets: the model does not predict them; a refusal must say so and change nothing.
        if (limited && want == KVRT_OK && got == KVRT_ERR_OUT_OF_MEMORY) {
          if (std::strstr(kvrt_last_error(), "memory_limit") == nullptr)
            Die("OOM without the limit named");
        } else {
          Expect(got, want, op == 2 ? "prefill" : "append");
        }
        if (got == KVRT_OK) {
          lm->k.insert(lm->k.end(), kf.begin(), kf.end());
          lm->v.insert(lm->v.end(), vf.begin(), vf.end());
          lm->length += n;
          lm->attended = false;
          m.total_tokens += n;
        }
        if (lm) {
          int64_t len = -1;
          Expect(kvrt_seq_length(rt, id, layer, &len), KVRT_OK, "seq_length");
          if (len != lm->length) Die("length after prefill/append", len, lm->length);
        }
        break;
      }
      case 5:
      case 6: {  // attend
        bool live, layer_ok;
        const kvrt_seq_id id = pick_seq(in.u8(), &live);
        const int32_t layer = pick_layer(in.u8(), &layer_ok);
        const uint8_t flags = in.u8();
        std::vector<unsigned char> qraw;
        std::vector<float> qf;
        MakeTensor(c, 1, c.num_q_heads, &rng, amp, &qraw, &qf);
        const bool nan = c.check_finite && (flags & 0x70) == 0x70;
        if (nan) {
          const float bad = NAN;
          kvrt::ConvertFromF32(&bad, 1, static_cast<kvrt::DType>(c.dtype), qraw.data());
        }
        const bool null_out = (flags & 0x8c) == 0x8c;
        std::vector<float> out(static_cast<size_t>(c.num_q_heads) * c.head_dim, -123.f);
        LayerModel* lm = live && layer_ok ? &m.seqs[id][layer] : nullptr;
        kvrt_status want = KVRT_OK;
        if (null_out || nan)
          want = KVRT_ERR_INVALID_ARGUMENT;
        else if (!layer_ok)
          want = KVRT_ERR_INVALID_ARGUMENT;
        else if (!live)
          want = KVRT_ERR_NOT_FOUND;
        else if (lm->length == 0)
          want = KVRT_ERR_FAILED_PRECONDITION;
        const kvrt_status got =
            kvrt_attend(rt, id, layer, qraw.data(), null_out ? nullptr : out.data());
        Expect(got, want, "attend");
        if (got != KVRT_OK) {
          for (float x : out)
            if (x != -123.f) Die("failed attend wrote its output");
          break;
        }
        lm->attended = true;
        if (CanCompareExactly(m, lm->length)) {
          CheckAttention(m, *lm, qf, out);
        } else {
          for (float x : out)
            if (!std::isfinite(x)) Die("attend output not finite");
        }
        break;
      }
      case 7: {  // get_attended
        bool live, layer_ok;
        const kvrt_seq_id id = pick_seq(in.u8(), &live);
        const int32_t layer = pick_layer(in.u8(), &layer_ok);
        const int32_t h = in.range(0, c.num_q_heads);  // == num_q_heads is out of range
        const int64_t cap = in.range(0, 80);
        std::vector<int64_t> buf(cap + 1, -5);
        int64_t count = -1;
        const kvrt_status got = kvrt_get_attended(rt, id, layer, h, buf.data(), cap, &count);
        LayerModel* lm = live && layer_ok ? &m.seqs[id][layer] : nullptr;
        kvrt_status want = KVRT_OK;
        if (!c.record_attended)
          want = KVRT_ERR_FAILED_PRECONDITION;
        else if (h >= c.num_q_heads || !layer_ok)
          want = KVRT_ERR_INVALID_ARGUMENT;
        else if (!live)
          want = KVRT_ERR_NOT_FOUND;
        else if (!lm->attended) {
          // An attend before the last append still counts as "an attend happened"; the ids are
          // then those of that attend. Only a never-attended layer must fail.
          if (got == KVRT_OK) break;
          want = KVRT_ERR_FAILED_PRECONDITION;
        }
        Expect(got, want, "get_attended");
        if (buf[cap] != -5) Die("get_attended wrote past capacity", cap);
        if (got == KVRT_OK && c.index_kind == KVRT_INDEX_EXACT) {
          if (count != lm->length) Die("EXACT attended count != length", count, lm->length);
          std::vector<char> seen(lm->length, 0);
          for (int64_t i = 0; i < std::min(count, cap); ++i) {
            if (buf[i] < 0 || buf[i] >= lm->length || seen[buf[i]]) Die("attended id", buf[i], i);
            seen[buf[i]] = 1;
          }
        }
        break;
      }
      case 8: CheckCounts(rt, m); break;
      case 9: {  // null and out-of-range arguments of the small calls
        int64_t n;
        Expect(kvrt_seq_length(rt, 0, 0, nullptr), KVRT_ERR_INVALID_ARGUMENT, "seq_length(NULL)");
        Expect(kvrt_seq_length(nullptr, 0, 0, &n), KVRT_ERR_INVALID_ARGUMENT,
               "seq_length(rt NULL)");
        Expect(kvrt_get_stats(rt, nullptr), KVRT_ERR_INVALID_ARGUMENT, "get_stats(NULL)");
        Expect(kvrt_seq_create(rt, nullptr), KVRT_ERR_INVALID_ARGUMENT, "seq_create(NULL)");
        kvrt_exec e = kvrt_exec_default();
        e.memory = KVRT_MEMORY_DEVICE;
        Expect(kvrt_attend_ex(rt, 0, 0, nullptr, nullptr, &e), KVRT_ERR_UNIMPLEMENTED, "attend_ex");
        break;
      }
    }
  }
  CheckCounts(rt, m);
  kvrt_runtime_destroy(rt);
  return 0;
}
