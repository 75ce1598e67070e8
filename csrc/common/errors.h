// Typed errors with a stable code. Every failure inside the addon becomes a trimkv::Error;
// the binding turns it into a JS TrimKVError with the same code. Nothing here aborts.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace trimkv {

/// Stable error codes, mirrored by lib/errors.ts.
namespace code {
inline constexpr const char* kInvalidArgument = "ERR_INVALID_ARGUMENT";
inline constexpr const char* kShape = "ERR_SHAPE";
inline constexpr const char* kDType = "ERR_DTYPE";
inline constexpr const char* kRange = "ERR_RANGE";
inline constexpr const char* kState = "ERR_STATE";
inline constexpr const char* kDisposed = "ERR_DISPOSED";
inline constexpr const char* kBackendUnavailable = "ERR_BACKEND_UNAVAILABLE";
inline constexpr const char* kUnsupported = "ERR_UNSUPPORTED";
inline constexpr const char* kOutOfMemory = "ERR_OUT_OF_MEMORY";
inline constexpr const char* kNative = "ERR_NATIVE";
}  // namespace code

class Error : public std::runtime_error {
 public:
  Error(const char* code, const std::string& message) : std::runtime_error(message), code_(code) {}
  const char* code() const { return code_; }

 private:
  const char* code_;
};

namespace detail {
inline void append_all(std::ostringstream&) {}
template <typename T, typename... Rest>
void append_all(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  append_all(os, rest...);
}
}  // namespace detail

/// Builds a message from its parts: fail(code::kShape, "q has ", n, " rows").
template <typename... Parts>
[[noreturn]] void fail(const char* code, const Parts&... parts) {
  std::ostringstream os;
  detail::append_all(os, parts...);
  throw Error(code, os.str());
}

#define TRIMKV_CHECK(cond, code_, ...)               \
  do {                                               \
    if (!(cond)) ::trimkv::fail(code_, __VA_ARGS__); \
  } while (0)

}  // namespace trimkv
