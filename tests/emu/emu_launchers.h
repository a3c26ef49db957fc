// The emulated CUDA launchers (csrc/cuda/*.cu compiled by csrc/emu), callable from a test that
// also links the CPU kernels. The emulated sources live in namespace genflow_emu (CMakeLists.txt
// compiles them with -Dgenflow=genflow_emu, so their device-side versions of csrc/common/'s
// inline functions stay apart from the host versions); these entry points take the same
// parameter structs (identical definitions) as genflow::, passed by address with their size.
// Each returns the launcher's cudaError_t as an int (0: success).
#pragma once

#include <cstddef>
#include <cstdint>

namespace emu_launchers {

int fused_update(const void* params, size_t size, int dtype);
int langevin_update(const void* params, size_t size, int dtype);
int hutchinson_probes(const void* params, size_t size, int dtype);
int probe_dot(const void* params, size_t size, int dtype);
int kernel_weighted_mean(const void* params, size_t size, int dtype);
int kernel_weighted_mean_backward(const void* params, size_t size, int dtype);

void set_sm_count(int sms);
void set_compute_capability(int major);
void set_block_filter(bool (*keep)(uint64_t block, void* ctx), void* ctx);
uint64_t blocks_run();
bool fast_math_model();  // built with GENFLOW_EMU_FAST_MATH (nvcc --use_fast_math's rounding)

}  // namespace emu_launchers
