// Run-time values -> template parameters, in one place. The default case of every switch
// raises a clear error naming the op and what it got.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// IK_DTYPE_SWITCH(dtype, "op", [&] { ... use T ... }): T is float, __half or __nv_bfloat16.
#define IK_DTYPE_SWITCH(DTYPE, OP_NAME, ...)                                                            \
  [&] {                                                                                                \
    switch (DTYPE) {                                                                                   \
      case at::ScalarType::Float: {                                                                    \
        using T = float;                                                                               \
        return __VA_ARGS__();                                                                          \
      }                                                                                                \
      case at::ScalarType::Half: {                                                                     \
        using T = __half;                                                                              \
        return __VA_ARGS__();                                                                          \
      }                                                                                                \
      case at::ScalarType::BFloat16: {                                                                 \
        using T = __nv_bfloat16;                                                                       \
        return __VA_ARGS__();                                                                          \
      }                                                                                                \
      default:                                                                                         \
        TORCH_CHECK(false, OP_NAME, ": the cuda backend supports float32, float16 and bfloat16, got ", \
                    DTYPE);                                                                            \
    }                                                                                                  \
  }()

// IK_BOOL_SWITCH(condition, kName, [&] { ... use kName as a constexpr bool ... })
#define IK_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                       \
    if (COND) {                               \
      constexpr bool CONST_NAME = true;       \
      return __VA_ARGS__();                   \
    } else {                                  \
      constexpr bool CONST_NAME = false;      \
      return __VA_ARGS__();                   \
    }                                         \
  }()

// IK_HALF_DTYPE_SWITCH(dtype, "op", [&] { ... }): T is __half or __nv_bfloat16 (tensor-core kernels).
#define IK_HALF_DTYPE_SWITCH(DTYPE, OP_NAME, ...)                                                  \
  [&] {                                                                                           \
    switch (DTYPE) {                                                                              \
      case at::ScalarType::Half: {                                                                \
        using T = __half;                                                                         \
        return __VA_ARGS__();                                                                     \
      }                                                                                           \
      case at::ScalarType::BFloat16: {                                                            \
        using T = __nv_bfloat16;                                                                  \
        return __VA_ARGS__();                                                                     \
      }                                                                                           \
      default:                                                                                    \
        TORCH_CHECK(false, OP_NAME, ": the cuda backend supports float16 and bfloat16, got ", DTYPE); \
    }                                                                                             \
  }()

// IK_HEAD_DIM_SWITCH(head_dim, "op", [&] { ... use kHeadDim ... }): the compiled head dims.
#define IK_HEAD_DIM_SWITCH(HEAD_DIM, OP_NAME, ...)                                                 \
  [&] {                                                                                           \
    switch (HEAD_DIM) {                                                                           \
      case 64: {                                                                                  \
        constexpr int kHeadDim = 64;                                                              \
        return __VA_ARGS__();                                                                     \
      }                                                                                           \
      case 128: {                                                                                 \
        constexpr int kHeadDim = 128;                                                             \
        return __VA_ARGS__();                                                                     \
      }                                                                                           \
      default:                                                                                    \
        TORCH_CHECK(false, OP_NAME, ": the cuda backend has head_dim 64 and 128, got ", HEAD_DIM); \
    }                                                                                             \
  }()
