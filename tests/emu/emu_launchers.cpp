// Entry points into the emulated CUDA launchers (tests/emu/emu_launchers.h). Compiled like the
// emulated .cu copies (-Dgenflow=genflow_emu, csrc/emu/include first on the include path).
#include "emu_launchers.h"

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/fused_update.h"
#include "common/hutchinson.h"
#include "common/kernel_mean.h"
#include "common/langevin.h"

namespace emu_launchers {
namespace {

template <typename P> P unpack(const void* params, size_t size) {
  static_assert(std::is_trivially_copyable_v<P>, "parameter structs are copied bytewise");
  if (size != sizeof(P)) {
    std::fprintf(stderr, "emu_launchers: parameter struct of %zu bytes, expected %zu\n", size, sizeof(P));
    std::abort();
  }
  P p;
  std::memcpy(&p, params, sizeof(P));
  return p;
}

genflow::Dtype dtype_of(int dtype) { return static_cast<genflow::Dtype>(dtype); }

}  // namespace

int fused_update(const void* params, size_t size, int dtype) {
  return genflow::launch_fused_update(unpack<genflow::FusedUpdateParams>(params, size), dtype_of(dtype), nullptr);
}
int langevin_update(const void* params, size_t size, int dtype) {
  return genflow::launch_langevin_update(unpack<genflow::LangevinParams>(params, size), dtype_of(dtype), nullptr);
}
int hutchinson_probes(const void* params, size_t size, int dtype) {
  return genflow::launch_hutchinson_probes(unpack<genflow::ProbeParams>(params, size), dtype_of(dtype), nullptr);
}
int probe_dot(const void* params, size_t size, int dtype) {
  return genflow::launch_probe_dot(unpack<genflow::ProbeDotParams>(params, size), dtype_of(dtype), nullptr);
}
int kernel_weighted_mean(const void* params, size_t size, int dtype) {
  return genflow::launch_kernel_weighted_mean(unpack<genflow::KernelMeanParams>(params, size), dtype_of(dtype),
                                              nullptr);
}
int kernel_weighted_mean_backward(const void* params, size_t size, int dtype) {
  return genflow::launch_kernel_weighted_mean_backward(unpack<genflow::KernelMeanBackwardParams>(params, size),
                                                       dtype_of(dtype), nullptr);
}

void set_sm_count(int sms) { emu::set_sm_count(sms); }
void set_compute_capability(int major) { emu::set_compute_capability(major); }
void set_block_filter(bool (*keep)(uint64_t, void*), void* ctx) { emu::set_block_filter(keep, ctx); }
uint64_t blocks_run() { return emu::blocks_run(); }
bool fast_math_model() {
#if defined(GENFLOW_EMU_FAST_MATH)
  return true;
#else
  return false;
#endif
}

}  // namespace emu_launchers
