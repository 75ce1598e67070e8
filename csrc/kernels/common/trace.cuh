// Harness-only timeline records of the decode kernels (bench/kernels/decode): globaltimer
// stamps at phase boundaries of each block, into decode_params_t::trace. Compiled out unless
// TRIMKV_DECODE_TRACE is defined, as in every library build.
#pragma once

// Harness-only timeline records (globaltimer at phase boundaries of each block): compiled out
// unless TRIMKV_DECODE_TRACE is defined.
#ifdef TRIMKV_DECODE_TRACE
#define TRIMKV_TRACE_AT(k)                                                                   \
  do {                                                                                       \
    if (p.trace != nullptr && threadIdx.x == 0) {                                            \
      unsigned long long t_;                                                                 \
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));                                 \
      p.trace[((size_t)(blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * 8 + \
              (k)] = t_;                                                                     \
    }                                                                                        \
  } while (0)
#define TRIMKV_TRACE_VAL(k, v)                                                               \
  do {                                                                                       \
    if (p.trace != nullptr && threadIdx.x == 0)                                              \
      p.trace[((size_t)(blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * 8 + \
              (k)] = (v);                                                                    \
  } while (0)
#else
#define TRIMKV_TRACE_AT(k) \
  do {                     \
  } while (0)
#define TRIMKV_TRACE_VAL(k, v) \
  do {                         \
  } while (0)
#endif
