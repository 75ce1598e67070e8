{
  "targets": [
    {
      "target_name": "trimkv",
      "sources": [
        "csrc/cpu/attention_cpu.cc",
        "csrc/cpu/cache_cpu.cc",
        "csrc/cpu/gate_cpu.cc",
        "csrc/cpu/parallel.cc",
        "csrc/cuda_none/cuda_unavailable.cc",
        "csrc/cuda_none/device_none.cc",
        "csrc/model/forward_cpu.cc",
        "csrc/model/model.cc",
        "csrc/ops/cache.cc",
        "csrc/ops/gate.cc",
        "csrc/ops/support.cc",
        "csrc/runtime/tensor.cc",
        "csrc/napi/addon.cc",
        "csrc/napi/bench.cc",
        "csrc/napi/cache.cc",
        "csrc/napi/gate.cc",
        "csrc/napi/model.cc",
        "csrc/napi/runtime.cc",
        "csrc/napi/support.cc",
        "csrc/napi/tensor.cc"
      ],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "csrc"
      ],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti"],
      "cflags_cc": ["-std=c++17", "-O2"],
      "xcode_settings": {
        "GCC_ENABLE_CPP_EXCEPTIONS": "YES",
        "CLANG_CXX_LANGUAGE_STANDARD": "c++17"
      }
    }
  ]
}
