#include "runtime/tensor.h"

#include <unistd.h>

#include <cstring>
#include <new>
#include <sstream>

#include "common/errors.h"

namespace trimkv {

size_t host_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page) : 0;
}

void check_host_allocation(size_t bytes, const char* what) {
  const size_t total = host_memory_bytes();
  if (total > 0 && bytes > total) {
    fail(code::kOutOfMemory, "out of host memory: ", what, " needs ", bytes,
         " bytes but this machine has ", total);
  }
}

Buffer::Buffer(Backend backend, size_t bytes) : backend_(backend), bytes_(bytes) {
  if (backend == Backend::kCuda) {
    data_ = device_alloc(bytes);
  } else {
    check_host_allocation(bytes, "a tensor");
    data_ = ::operator new(bytes == 0 ? 1 : bytes, std::nothrow);
    if (!data_) fail(code::kOutOfMemory, "out of host memory allocating ", bytes, " bytes");
  }
}

Buffer::~Buffer() {
  if (backend_ == Backend::kCuda) {
    device_free(data_);
  } else {
    ::operator delete(data_);
  }
}

namespace {
int64_t count(const std::vector<int64_t>& shape) {
  constexpr int64_t kMaxElements = int64_t{1} << 40;
  for (int64_t d : shape)
    TRIMKV_CHECK(d >= 0 && d <= kMaxElements, code::kShape, "invalid dimension ", d);
  // A zero anywhere makes the tensor empty; otherwise the product is checked before each
  // multiplication, so it can never wrap (2^32 x 2^32 would be 0 in 64 bits).
  for (int64_t d : shape) {
    if (d == 0) return 0;
  }
  int64_t n = 1;
  for (int64_t d : shape) {
    TRIMKV_CHECK(n <= kMaxElements / d, code::kShape, "tensor too large: more than 2^40 elements");
    n *= d;
  }
  return n;
}
}  // namespace

Tensor::Tensor(Backend backend, DType dtype, std::vector<int64_t> shape)
    : dtype_(dtype), shape_(std::move(shape)), numel_(count(shape_)) {
  buffer_ = std::make_shared<Buffer>(backend, static_cast<size_t>(numel_) * dtype_size(dtype_));
}

void Tensor::write_f32(const float* src, size_t n) {
  TRIMKV_CHECK(n == static_cast<size_t>(numel_), code::kShape, "write of ", n, " values into ",
               describe());
  std::vector<uint8_t> staging;
  void* dst = data();
  if (backend() == Backend::kCuda) {
    staging.resize(bytes());
    dst = staging.data();
  }
  if (dtype_ == DType::kF32) {
    std::memcpy(dst, src, n * 4);
  } else {
    for (size_t i = 0; i < n; ++i) store_from_float(dst, dtype_, i, src[i]);
  }
  if (backend() == Backend::kCuda) copy_to_device(data(), staging.data(), bytes());
}

void Tensor::write_raw16(const uint16_t* src, size_t n) {
  TRIMKV_CHECK(dtype_ != DType::kF32, code::kDType, "raw 16-bit data cannot be written into ",
               describe());
  TRIMKV_CHECK(n == static_cast<size_t>(numel_), code::kShape, "write of ", n, " values into ",
               describe());
  if (backend() == Backend::kCuda) {
    copy_to_device(data(), src, bytes());
  } else {
    std::memcpy(data(), src, bytes());
  }
}

void Tensor::read_f32(float* dst) const {
  std::vector<uint8_t> staging;
  const void* src = data();
  if (backend() == Backend::kCuda) {
    staging.resize(bytes());
    copy_to_host(staging.data(), data(), bytes());
    src = staging.data();
  }
  if (dtype_ == DType::kF32) {
    std::memcpy(dst, src, static_cast<size_t>(numel_) * 4);
  } else {
    for (int64_t i = 0; i < numel_; ++i)
      dst[i] = load_as_float(src, dtype_, static_cast<size_t>(i));
  }
}

std::string Tensor::describe() const {
  std::ostringstream os;
  os << dtype_name(dtype_) << "[";
  for (size_t i = 0; i < shape_.size(); ++i) os << (i ? ", " : "") << shape_[i];
  os << "]";
  return os.str();
}

}  // namespace trimkv
