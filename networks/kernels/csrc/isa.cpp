// Copyright MedAttnSlicer contributors. Apache-2.0.
//
// Run-time choice of the code path. The library is built without -march flags (it must run on any x86-64 machine
// it is copied to), and the AVX2 / AVX-512 code lives in translation units compiled for those ISAs with target
// pragmas; nothing calls into them unless CPUID (via __builtin_cpu_supports, which also checks that the OS saves the
// ymm / zmm state) says this CPU has every feature they were compiled for.
#include <c10/util/Exception.h>

#include <cctype>
#include <cstdlib>
#include <string>

#include "local_attention.h"

namespace medattn {
namespace {

Isa detect_best_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // the AVX-512 TUs are compiled for F/BW/DQ/VL/VNNI/VBMI: every CPU with VNNI and VBMI has DQ and VL too, but
  // checking costs nothing
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi"))
    return Isa::kAvx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

// Names are matched without surrounding blanks and case-insensitively (" AVX2 " is avx2), as networks/isa.py does.
std::string normalised(const std::string& name) {
  size_t begin = 0, end = name.size();
  while (begin < end && std::isspace(static_cast<unsigned char>(name[begin]))) ++begin;
  while (end > begin && std::isspace(static_cast<unsigned char>(name[end - 1]))) --end;
  std::string out = name.substr(begin, end - begin);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

bool parse_isa(const std::string& name, Isa* isa) {
  if (name == "avx512_vnni") *isa = Isa::kAvx512Vnni;
  else if (name == "avx2") *isa = Isa::kAvx2;
  else if (name == "portable") *isa = Isa::kPortable;
  else return false;
  return true;
}

}  // namespace

GeometryView geometry_view(const AttentionGeometry& g) {
  GeometryView v;
  v.batch = g.batch;
  v.channels = g.channels;
  v.heads = g.heads;
  v.depth = g.depth;
  v.height = g.height;
  v.width = g.width;
  v.kernel_size = g.kernel_size;
  v.volumetric = g.volumetric ? 1 : 0;
  v.radius = g.radius();
  v.window_depth = g.window_depth();
  v.window_rows = g.window_rows();
  v.neighbours = g.neighbours();
  v.head_channels = g.head_channels();
  v.pixels = g.pixels();
  return v;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

Isa cpu_best_isa() {
  static const Isa best = detect_best_isa();
  return best;
}

bool cpu_supports(Isa isa) { return static_cast<int>(isa) <= static_cast<int>(cpu_best_isa()); }

Isa require_isa(const std::string& requested, const char* what) {
  const std::string name = normalised(requested);
  Isa isa = Isa::kPortable;
  TORCH_CHECK(parse_isa(name, &isa), what, ": unknown ISA '", name,
              "'; expected one of avx512_vnni, avx2, portable");
  TORCH_CHECK(cpu_supports(isa), what, ": the ", name, " code path was requested but this CPU lacks it (the best "
              "this CPU supports is ", isa_name(cpu_best_isa()), "); use ", isa_name(cpu_best_isa()),
              " or a lower one");
  return isa;
}

namespace {

// MEDATTN_ISA is read once per process; a bad value keeps raising on every call rather than falling back silently.
struct Selection {
  Isa isa = Isa::kPortable;
  std::string error;
};

Selection select_once() {
  Selection s;
  const char* env = std::getenv("MEDATTN_ISA");
  const std::string name = normalised(env ? env : "");
  if (name.empty() || name == "native") {
    s.isa = cpu_best_isa();
    return s;
  }
  try {
    s.isa = require_isa(name, "MEDATTN_ISA");
  } catch (const c10::Error& e) {
    s.error = e.what_without_backtrace();
  }
  return s;
}

}  // namespace

Isa selected_isa() {
  static const Selection selection = select_once();
  TORCH_CHECK(selection.error.empty(), selection.error);
  return selection.isa;
}

}  // namespace medattn
