// Shared helpers of the mae_fast CPU kernels: float <-> storage conversions that vectorise, runtime choice of an
// AVX2+FMA build of the hot loops (the extension itself is compiled for a portable baseline), and input checks.
#pragma once

// Only the headers these kernels use (ATen/ATen.h would pull in every op and double the build time).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#define MAE_FAST_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) || defined(__i386__)
// Hot loops are written once as always-inline bodies and instantiated twice: in a function compiled for AVX2+FMA
// (chosen at run time when the CPU has it) and in a baseline one. Inlining a baseline body into an AVX2 caller
// is allowed (its ISA is a subset), so the body gets vectorised for the wider target.
#define MAE_FAST_AVX2 __attribute__((target("avx2,fma")))
inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
#define MAE_FAST_AVX2
inline bool cpu_has_avx2_fma() { return false; }
#endif

namespace mae_fast {

// Storage types as plain integers so that conversions stay branch-free and vectorise (c10::BFloat16 / c10::Half
// conversions are out-of-line on some builds).
struct bf16_t { uint16_t bits; };

MAE_FAST_INLINE float to_float(float x) { return x; }
MAE_FAST_INLINE float to_float(double x) { return static_cast<float>(x); }
MAE_FAST_INLINE float to_float(bf16_t x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
MAE_FAST_INLINE float to_float(c10::Half x) { return static_cast<float>(x); }

template <typename T> MAE_FAST_INLINE T from_float(float x);
template <> MAE_FAST_INLINE float from_float<float>(float x) { return x; }
template <> MAE_FAST_INLINE double from_float<double>(float x) { return x; }
template <> MAE_FAST_INLINE bf16_t from_float<bf16_t>(float x) {
  // round to nearest even, as c10::BFloat16; NaN stays a quiet NaN
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return bf16_t{static_cast<uint16_t>(nan ? 0x7fc0u : rounded)};
}
template <> MAE_FAST_INLINE c10::Half from_float<c10::Half>(float x) { return c10::Half(x); }

// The kernels' view of a float tensor's storage type.
template <typename T> struct storage { using type = T; };
template <> struct storage<c10::BFloat16> { using type = bf16_t; };

template <typename T>
inline const typename storage<T>::type* cptr(const at::Tensor& t) {
  return reinterpret_cast<const typename storage<T>::type*>(t.const_data_ptr());
}
template <typename T>
inline typename storage<T>::type* mptr(const at::Tensor& t) {
  return reinterpret_cast<typename storage<T>::type*>(t.mutable_data_ptr());
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "mae_fast CPU kernel: ", name, " must be a CPU tensor, got ", t.device());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "mae_fast CPU kernel: ", name, " must be contiguous");
}

// Calls f(scalar type tag) for float32 / bfloat16 / float16 tensors.
#define MAE_FAST_DISPATCH_FLOAT(dtype, name, ...)                                                   \
  [&] {                                                                                              \
    switch (dtype) {                                                                                 \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                             \
      case at::kBFloat16: { using scalar_t = c10::BFloat16; return __VA_ARGS__(); }                  \
      case at::kHalf: { using scalar_t = c10::Half; return __VA_ARGS__(); }                          \
      default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype, " (float32, bfloat16, float16)"); \
    }                                                                                                \
  }()

}  // namespace mae_fast
