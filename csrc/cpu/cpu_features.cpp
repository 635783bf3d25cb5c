// CPU feature detection and the FASTPEFT_CPU_ISA cap (see cpu_features.h).
#include "cpu_features.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define FASTPEFT_X86 1
#endif

namespace fastpeft {
namespace {

struct Detected {
  std::map<std::string, bool> features;
  CpuIsa isa = CpuIsa::kPortable;
};

#ifdef FASTPEFT_X86
uint64_t xcr0() {  // which register states the OS saves on a context switch
  uint32_t eax, edx;
  __asm__("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t{edx} << 32) | eax;
}
#endif

Detected detect() {
  Detected d;
  auto& f = d.features;
  for (const char* name : {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vbmi",
                           "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"})
    f[name] = false;
#ifdef FASTPEFT_X86
  uint32_t a, b, c, e;
  if (!__get_cpuid(1, &a, &b, &c, &e)) return d;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
  const uint64_t xcr = osxsave ? xcr0() : 0;
  const bool os_avx = (xcr & 0x6) == 0x6;                // XMM and YMM state
  const bool os_avx512 = os_avx && (xcr & 0xE0) == 0xE0;  // opmask, ZMM0-15 upper halves, ZMM16-31
  const bool os_amx = (xcr & 0x60000) == 0x60000;         // XTILECFG, XTILEDATA
  if (__get_cpuid_max(0, nullptr) < 7) return d;
  __cpuid_count(7, 0, a, b, c, e);
  const uint32_t leaf7_ebx = b, leaf7_ecx = c, leaf7_edx = e;
  __cpuid_count(7, 1, a, b, c, e);
  const uint32_t leaf7_1_eax = a;
  f["fma"] = os_avx && fma;
  f["f16c"] = os_avx && f16c;
  f["avx2"] = os_avx && (leaf7_ebx & (1u << 5));
  f["avx512f"] = os_avx512 && (leaf7_ebx & (1u << 16));
  f["avx512dq"] = os_avx512 && (leaf7_ebx & (1u << 17));
  f["avx512bw"] = os_avx512 && (leaf7_ebx & (1u << 30));
  f["avx512vl"] = os_avx512 && (leaf7_ebx & (1u << 31));
  f["avx512vbmi"] = os_avx512 && (leaf7_ecx & (1u << 1));
  f["avx512_vnni"] = os_avx512 && (leaf7_ecx & (1u << 11));
  f["avx512_bf16"] = os_avx512 && (leaf7_1_eax & (1u << 5));
  f["amx_bf16"] = os_amx && (leaf7_edx & (1u << 22));
  f["amx_tile"] = os_amx && (leaf7_edx & (1u << 24));
  // F16C (fp16 <-> fp32 conversions) came with AVX2 on every CPU that has both; a VM can hide it.
  if (f["avx2"] && f["fma"] && f["f16c"]) d.isa = CpuIsa::kAvx2;
  if (d.isa == CpuIsa::kAvx2 && f["avx512f"] && f["avx512bw"] && f["avx512vl"] && f["avx512dq"])
    d.isa = CpuIsa::kAvx512;
  if (d.isa == CpuIsa::kAvx512 && f["avx512_bf16"]) d.isa = CpuIsa::kAvx512Bf16;
#endif
  return d;
}

const Detected& detected() {
  static const Detected d = detect();
  return d;
}

constexpr const char* kIsaNames[] = {"portable", "avx2", "avx512", "avx512_bf16"};

}  // namespace

const char* cpu_isa_name(CpuIsa isa) { return kIsaNames[static_cast<int>(isa)]; }

std::map<std::string, bool> cpu_features() { return detected().features; }

CpuIsa cpu_isa_supported() { return detected().isa; }

CpuIsa cpu_isa() {
  const CpuIsa supported = cpu_isa_supported();
  const char* cap = std::getenv("FASTPEFT_CPU_ISA");  // read per call: tests and users change it at run time
  if (cap == nullptr || *cap == '\0') return supported;
  for (int i = 0; i < 4; ++i)
    if (std::strcmp(cap, kIsaNames[i]) == 0) return static_cast<CpuIsa>(std::min(i, static_cast<int>(supported)));
  TORCH_CHECK(false, "FASTPEFT_CPU_ISA='", cap, "' is not one of portable, avx2, avx512, avx512_bf16");
}

}  // namespace fastpeft
