// A tensor owned by a runtime: a shape, a storage dtype and a buffer in host memory (CPU
// backend) or device memory (CUDA backend). Contiguous, row-major.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "runtime/device.h"

namespace trimkv {

/// Owns bytes on one backend. Freed when the last reference goes (a pending read keeps it).
class Buffer {
 public:
  Buffer(Backend backend, size_t bytes);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  Backend backend() const { return backend_; }
  void* data() { return data_; }
  const void* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  Backend backend_;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

class Tensor {
 public:
  Tensor(Backend backend, DType dtype, std::vector<int64_t> shape);

  Backend backend() const { return buffer_->backend(); }
  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t numel() const { return numel_; }
  size_t bytes() const { return buffer_->bytes(); }
  void* data() { return buffer_->data(); }
  const void* data() const { return buffer_->data(); }
  std::shared_ptr<Buffer> buffer() const { return buffer_; }

  /// Writes float32 values, converted to the storage dtype.
  void write_f32(const float* src, size_t n);
  /// Writes raw 16-bit patterns (fp16 / bf16 tensors only).
  void write_raw16(const uint16_t* src, size_t n);
  /// Reads all values as float32 into dst (numel() floats).
  void read_f32(float* dst) const;

  std::string describe() const;  // e.g. "bf16[4, 8, 128]"

 private:
  DType dtype_;
  std::vector<int64_t> shape_;
  int64_t numel_;
  std::shared_ptr<Buffer> buffer_;
};

}  // namespace trimkv
