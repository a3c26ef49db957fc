// Runs one kernel of tests/emu/faulty_kernels.cu under the emulation:
//
//   emu_faulty NAME      (correct | correct_dynamic | missing_sync | oob_global | oob_shared |
//                         divergent_barrier | exited_lane)
//
// Prints "result ok" or "wrong result" and exits 0 / 1. The faulty kernels must be caught: by
// ASan (oob_*), by TSan or the poisoned shared memory's wrong result (missing_sync), by the
// emulation's own checks (divergent_barrier, exited_lane); CMakeLists.txt registers one ctest per
// kernel with the report it must print.
#include <cstdio>
#include <vector>

namespace faulty {
int run(const char* name, const float* in, float* out, int blocks);
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: emu_faulty NAME\n");
    return 2;
  }
  constexpr int kBlocks = 3, kN = kBlocks * 64;
  std::vector<float> in(kN), out(kN);  // exactly sized: one past the end is one past the allocation
  for (int i = 0; i < kN; ++i) in[i] = static_cast<float>(i) + 0.5f;
  const int status = faulty::run(argv[1], in.data(), out.data(), kBlocks);
  if (status == 3) {
    std::fprintf(stderr, "unknown kernel %s\n", argv[1]);
    return 2;
  }
  std::printf(status == 0 ? "result ok\n" : "wrong result\n");
  return status == 0 ? 0 : 1;
}
