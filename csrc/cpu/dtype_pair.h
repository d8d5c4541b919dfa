// The dtypes of the CPU kernels that take two floating inputs whose dtypes may differ (student and
// teacher, input and target): every pair of float16, bfloat16, float32 and float64 is dispatched,
// and the loss accumulates in float64 if either input is float64, else in float32 (the runtime
// counterpart of vec_utils.h's acc_type_t).
#pragma once

#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>

namespace kdkernels {
namespace cpu {

inline at::ScalarType accumulation_dtype(at::ScalarType a, at::ScalarType b) {
  return a == at::kDouble || b == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace cpu
}  // namespace kdkernels

// Calls the lambda __VA_ARGS__ with the types A_T and B_T defined as the element types of the
// dtypes A_TYPE and B_TYPE; ATen's dispatch, so another dtype fails with ATen's message naming NAME.
#define KDKERNELS_DISPATCH_FLOATING_PAIR(A_TYPE, B_TYPE, NAME, A_T, B_T, ...)     \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A_TYPE, NAME, [&] {   \
    using A_T = scalar_t;                                                         \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, B_TYPE, NAME, [&] { \
      using B_T = scalar_t;                                                       \
      (__VA_ARGS__)();                                                            \
    });                                                                           \
  })
