// C++ tests of the torch-free noise header csrc/common/philox.h (run by ctest): the Random123
// known answers, the accuracy of the float32 log / sin / cos / sqrt approximations against
// double-precision libm, and the first two moments of the normal stream.
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "common/philox.h"

using namespace genflow::philox;

static int failures = 0;

static void check(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAILED: %s\n", what);
    ++failures;
  }
}

int main() {
  // Known-answer vectors of Philox4x32-10 (Random123 kat_vectors).
  const uint32_t zero[4] = {0, 0, 0, 0};
  uint32_t out[4];
  philox4x32_10(zero, 0u, 0u, out);
  check(out[0] == 0x6627e8d5u && out[1] == 0xe169c58du && out[2] == 0xbc57ac4cu && out[3] == 0x9b00dbd8u,
        "philox4x32_10(0, 0)");
  const uint32_t ones[4] = {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu};
  philox4x32_10(ones, 0xffffffffu, 0xffffffffu, out);
  check(out[0] == 0x408f276du && out[1] == 0x41c83b0eu && out[2] == 0xa20bc7c6u && out[3] == 0x6d5451fdu,
        "philox4x32_10(ones, ones)");

  // Approximations against libm in double precision.
  double worst_log = 0, worst_trig = 0, worst_sqrt = 0;
  for (uint32_t k = 1; k < (1u << 24); k += 97) {
    const float u = static_cast<float>(k) * 5.9604645e-08f;  // (0, 1]
    worst_log = std::fmax(worst_log, std::fabs(log_approx(u) - std::log(static_cast<double>(u))));
    float c, s;
    sincos_2pi_approx(u, &c, &s);
    const double angle = 2 * M_PI * static_cast<double>(u);
    worst_trig = std::fmax(worst_trig, std::fmax(std::fabs(c - std::cos(angle)), std::fabs(s - std::sin(angle))));
    const double v = 50.0 * u;
    worst_sqrt = std::fmax(worst_sqrt, std::fabs(sqrt_approx(static_cast<float>(v)) - std::sqrt(static_cast<float>(v))) /
                                           std::sqrt(v));
  }
  check(worst_log < 4e-6, "log_approx within 4e-6 absolute on (0, 1]");
  check(worst_trig < 3e-7, "sincos_2pi_approx within 3e-7 absolute");
  check(worst_sqrt < 2.5e-7, "sqrt_approx within 2 ulp");

  // Moments of 2^22 normals: mean 0 and variance 1 within 5 standard errors.
  const int n = 1 << 22;
  double sum = 0, sum2 = 0;
  for (int g = 0; g < n / 4; ++g) {
    float z[4];
    normal4(12345u, 7u, static_cast<uint64_t>(g), z);
    for (float v : z) {
      sum += v;
      sum2 += static_cast<double>(v) * v;
    }
  }
  const double mean = sum / n, var = sum2 / n - mean * mean;
  check(std::fabs(mean) < 5 / std::sqrt(static_cast<double>(n)), "normal stream mean 0");
  check(std::fabs(var - 1) < 5 * std::sqrt(2.0 / n), "normal stream variance 1");
  check(normal_at(12345u, 7u, 6) != normal_at(12345u, 8u, 6), "offsets give different streams");

  std::printf("%s (log %.2e, trig %.2e, sqrt %.2e, mean %.2e, var %.6f)\n", failures ? "FAILED" : "passed",
              worst_log, worst_trig, worst_sqrt, mean, var);
  return failures ? 1 : 0;
}
