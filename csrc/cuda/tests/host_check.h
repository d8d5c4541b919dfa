// The host tests' check macro (softmax_pair_walker_test.cu, divergences_test.cu): EXPECT(cond,
// printf-format, ...) counts the check, and on failure the failure, printing the first 30.
#pragma once

#include <cstdio>

namespace kdkernels {
namespace cuda {
namespace host_check {

inline int failures = 0;
inline int checks = 0;

}  // namespace host_check
}  // namespace cuda
}  // namespace kdkernels

#define EXPECT(cond, ...)                                                  \
  do {                                                                     \
    ++::kdkernels::cuda::host_check::checks;                               \
    if (!(cond)) {                                                         \
      if (++::kdkernels::cuda::host_check::failures <= 30) {               \
        std::printf("%s:%d: %s: ", __FILE__, __LINE__, #cond);             \
        std::printf(__VA_ARGS__);                                          \
        std::printf("\n");                                                 \
      }                                                                    \
    }                                                                      \
  } while (0)
