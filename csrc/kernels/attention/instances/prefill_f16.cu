// Instantiation of the prefill kernels for __half storage: one dtype per file so
// that the three build in parallel.
#include "kernels/attention/prefill.cuh"

namespace trimkv {
namespace prefill_detail {
template cudaError_t prefill_attention_typed<__half>(const prefill_params_t&, float*, cudaStream_t);
}  // namespace prefill_detail
}  // namespace trimkv
