// kvrt._kvrt: the nanobind extension over libkvrt's C API. Python code uses it through the kvrt
// package (kvrt/_runtime.py), which adds Config, Sequence, Stats and the exception classes.
#include <kvrt.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <string>
#include <vector>

#include "config_dict.h"
#include "errors.h"
#include "py_runtime.h"

namespace nb = nanobind;
using kvrt_py::InArray;
using kvrt_py::OutArray;
using kvrt_py::PyRuntime;

NB_MODULE(_kvrt, m) {
  m.doc() = "libkvrt's C API (kvrt.h) for the kvrt package; use kvrt.Runtime instead.";
  m.def("version", [] { return std::string(kvrt_version()); },
        "The libkvrt version loaded (kvrt_version).");
  m.def(
      "header_version",
      [] { return nb::make_tuple(KVRT_VERSION_MAJOR, KVRT_VERSION_MINOR, KVRT_VERSION_PATCH); },
      "The kvrt.h version this extension was compiled against (major, minor, patch).");
  m.def("status_string", [](int s) { return std::string(kvrt_status_string(kvrt_status(s))); });
  // Runtimes still alive at interpreter exit (held by a model or a global) are not leaks of
  // this module's making; the library frees them with the process.
  nb::set_leak_warnings(false);
  m.def("config_default", [] { return kvrt_py::ConfigToDict(kvrt_config_default()); },
        "kvrt_config_default() as a dict keyed by field name.");
  m.def("index_kinds", [] {
    std::vector<std::string> names;
    for (int32_t i = 0; i < kvrt_index_kind_count(); ++i) {
      names.emplace_back(kvrt_index_kind_name(kvrt_index_kind(i)));
    }
    return names;
  }, "The index kinds this library knows, by name (kvrt_index_kind_name).");
  m.def(
      "describe_search",
      [](const std::string& kind, int64_t top_k, int64_t effort) {
        kvrt_py::CheckI32("describe_search", {{"top_k", top_k}, {"search_effort", effort}});
        kvrt_index_kind k = KVRT_INDEX_FLAT;
        kvrt_status s = kvrt_index_kind_parse(kind.c_str(), &k);
        kvrt_py::Check(s, "describe_search", s == KVRT_OK ? "" : kvrt_last_error());
        char buf[256];
        s = kvrt_index_describe_search(k, top_k, effort, buf, sizeof buf);
        kvrt_py::Check(s, "describe_search", s == KVRT_OK ? "" : kvrt_last_error());
        return std::string(buf);
      },
      "kvrt_index_describe_search: the search settings a kind resolves for top_k and effort.");

  nb::class_<PyRuntime>(m, "Runtime")
      .def(nb::init<const nb::dict&>(), nb::arg("config"))
      .def("close", &PyRuntime::Close)
      .def_prop_ro("closed", &PyRuntime::closed)
      .def("config", &PyRuntime::Config)
      .def("describe_search", &PyRuntime::DescribeSearch)
      .def("stats", &PyRuntime::Stats)
      .def("seq_create", &PyRuntime::SeqCreate)
      .def("seq_release", &PyRuntime::SeqRelease, nb::arg("seq"))
      .def("seq_length", &PyRuntime::SeqLength, nb::arg("seq"), nb::arg("layer"))
      .def("seq_wait", &PyRuntime::SeqWait, nb::arg("seq"))
      .def(
          "prefill",
          [](PyRuntime& r, int64_t seq, int64_t layer, std::optional<kvrt_py::InArray> q,
             const kvrt_py::InArray& k, const kvrt_py::InArray& v, uintptr_t stream,
             bool sampled) { r.Prefill(seq, layer, q ? &*q : nullptr, k, v, stream, sampled); },
          nb::arg("seq"), nb::arg("layer"), nb::arg("q").none(), nb::arg("k"), nb::arg("v"),
          nb::arg("stream") = 0, nb::arg("sampled") = false)
      .def("prefill_query_rows", &PyRuntime::PrefillQueryRows, nb::arg("n_tokens"))
      .def("append", &PyRuntime::Append, nb::arg("seq"), nb::arg("layer"), nb::arg("k"),
           nb::arg("v"), nb::arg("stream") = 0)
      .def(
          "attend",
          [](PyRuntime& r, int64_t seq, int64_t layer, const InArray& q, const OutArray& out,
             std::optional<OutArray> lse,
             uintptr_t stream) { r.Attend(seq, layer, q, out, lse ? &*lse : nullptr, stream); },
          nb::arg("seq"), nb::arg("layer"), nb::arg("q"), nb::arg("out"),
          nb::arg("lse").none() = nb::none(), nb::arg("stream") = 0)
      .def(
          "attend_batch",
          [](PyRuntime& r, const std::vector<int64_t>& seqs, int64_t layer, const InArray& q,
             const OutArray& out, std::optional<OutArray> lse, uintptr_t stream) {
            r.AttendBatch(seqs, layer, q, out, lse ? &*lse : nullptr, stream);
          },
          nb::arg("seqs"), nb::arg("layer"), nb::arg("q"), nb::arg("out"),
          nb::arg("lse").none() = nb::none(), nb::arg("stream") = 0)
      .def(
          "append_attend",
          [](PyRuntime& r, int64_t seq, int64_t layer, const InArray& q, const InArray& k,
             const InArray& v, const OutArray& out, std::optional<OutArray> lse, uintptr_t stream) {
            r.AppendAttend(seq, layer, q, k, v, out, lse ? &*lse : nullptr, stream);
          },
          nb::arg("seq"), nb::arg("layer"), nb::arg("q"), nb::arg("k"), nb::arg("v"),
          nb::arg("out"), nb::arg("lse").none() = nb::none(), nb::arg("stream") = 0)
      .def(
          "append_attend_batch",
          [](PyRuntime& r, const std::vector<int64_t>& seqs, int64_t layer, const InArray& q,
             const InArray& k, const InArray& v, const OutArray& out, std::optional<OutArray> lse,
             uintptr_t stream) {
            r.AppendAttendBatch(seqs, layer, q, k, v, out, lse ? &*lse : nullptr, stream);
          },
          nb::arg("seqs"), nb::arg("layer"), nb::arg("q"), nb::arg("k"), nb::arg("v"),
          nb::arg("out"), nb::arg("lse").none() = nb::none(), nb::arg("stream") = 0)
      .def("set_head_policy", &PyRuntime::SetHeadPolicy, nb::arg("layer"), nb::arg("q_head"),
           nb::arg("policy"))
      .def("set_search_effort", &PyRuntime::SetSearchEffort, nb::arg("effort"))
      .def("get_attended", &PyRuntime::GetAttended, nb::arg("seq"), nb::arg("layer"),
           nb::arg("q_head"))
      .def("get_estimate_lse", &PyRuntime::GetEstimateLse, nb::arg("seq"), nb::arg("layer"),
           nb::arg("q_head"));
}
