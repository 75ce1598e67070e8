// Registration only: each group of ops lives in its own file.
#include "napi/common.h"

namespace {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* data = new trimkv::napi::addon_data_t();
  env.SetInstanceData(data);
  trimkv::napi::register_runtime(env, exports);
  trimkv::napi::register_tensor(env, exports, data);
  trimkv::napi::register_gate(env, exports);
  trimkv::napi::register_cache(env, exports);
  trimkv::napi::register_bench(env, exports);
  trimkv::napi::register_support(env, exports);
  trimkv::napi::register_model(env, exports);
  return exports;
}

}  // namespace

NODE_API_MODULE(trimkv, Init)
