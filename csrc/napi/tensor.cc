// Tensor handles: create, write from typed arrays, read (Promise or sync), dispose.
#include <cstdlib>
#include <memory>

#include "common/config.h"
#include "napi/common.h"

namespace trimkv::napi {
namespace {

/// The smallest typed-array length limit of the Node.js versions we support (2^32 on Node
/// 20, larger later): v8 aborts the process instead of throwing past it.
constexpr size_t kMaxFloat32ArrayLength = size_t{1} << 32;

/// Refuses a host copy of n floats that v8 could not allocate. v8::ArrayBuffer::New aborts the
/// process when its allocation fails, so the memory is tried (and given back) first: if
/// malloc cannot have it, neither can v8, and the caller gets ERR_OUT_OF_MEMORY instead.
void check_host_copy(size_t n) {
  if (n > kMaxFloat32ArrayLength) {
    fail(code::kOutOfMemory, "out of host memory: a Float32Array of ", n,
         " elements exceeds the typed-array limit of ", kMaxFloat32ArrayLength);
  }
  void* probe = std::malloc(n == 0 ? 1 : n * sizeof(float));
  if (probe == nullptr)
    fail(code::kOutOfMemory, "out of host memory allocating ", n * sizeof(float),
         " bytes for a read");
  std::free(probe);
}

/// Marks the objects TensorWrap constructs (napi_type_tag_object, N-API 8).
constexpr napi_type_tag kTensorTag = {0x7472696d6b765f74ULL, 0x656e736f725f7631ULL};

class TensorWrap : public Napi::ObjectWrap<TensorWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeTensor",
                       {InstanceMethod("write", &TensorWrap::Write),
                        InstanceMethod("readSync", &TensorWrap::ReadSync),
                        InstanceMethod("read", &TensorWrap::Read),
                        InstanceMethod("dispose", &TensorWrap::Dispose)});
  }

  // new NativeTensor(backend: 0 | 1, dtype: string, shape: number[])
  explicit TensorWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TensorWrap>(info) {
    guard(info.Env(), [&]() -> Napi::Value {
      const Backend backend = static_cast<Backend>(int_arg(info, 0, "backend"));
      TRIMKV_CHECK(info.Length() > 2 && info[1].IsString() && info[2].IsArray(),
                   code::kInvalidArgument, "NativeTensor(backend, dtype, shape)");
      const DType dtype = parse_dtype(info[1].As<Napi::String>().Utf8Value());
      Napi::Array dims = info[2].As<Napi::Array>();
      std::vector<int64_t> shape;
      for (uint32_t i = 0; i < dims.Length(); ++i) {
        Napi::Value d = dims.Get(i);
        TRIMKV_CHECK(d.IsNumber(), code::kShape, "shape entries must be numbers");
        const double v = d.As<Napi::Number>().DoubleValue();
        // Checked before the cast: converting NaN or a double beyond int64 is undefined.
        TRIMKV_CHECK(
            v >= 0 && v <= 1099511627776.0 && v == static_cast<double>(static_cast<int64_t>(v)),
            code::kShape, "invalid dimension ", v);
        shape.push_back(static_cast<int64_t>(v));
      }
      tensor_ = std::make_shared<Tensor>(backend, dtype, shape);
      info.This().As<Napi::Object>().TypeTag(&kTensorTag);
      return info.Env().Undefined();
    });
  }

  Tensor* get() {
    TRIMKV_CHECK(tensor_ != nullptr, code::kDisposed, "the tensor has been disposed");
    return tensor_.get();
  }

 private:
  Napi::Value Write(const Napi::CallbackInfo& info) {
    return guard(info.Env(), [&]() -> Napi::Value {
      Tensor* t = get();
      TRIMKV_CHECK(info.Length() > 0 && info[0].IsTypedArray(), code::kInvalidArgument,
                   "Expected a Float32Array or Uint16Array");
      Napi::TypedArray a = info[0].As<Napi::TypedArray>();
      if (a.TypedArrayType() == napi_float32_array) {
        Napi::Float32Array f = a.As<Napi::Float32Array>();
        t->write_f32(f.Data(), f.ElementLength());
      } else if (a.TypedArrayType() == napi_uint16_array) {
        Napi::Uint16Array u = a.As<Napi::Uint16Array>();
        t->write_raw16(u.Data(), u.ElementLength());
      } else {
        fail(code::kInvalidArgument, "Expected a Float32Array or Uint16Array");
      }
      return info.Env().Undefined();
    });
  }

  Napi::Value ReadSync(const Napi::CallbackInfo& info) {
    return guard(info.Env(), [&]() -> Napi::Value {
      Tensor* t = get();
      check_host_copy(static_cast<size_t>(t->numel()));
      Napi::Float32Array out = Napi::Float32Array::New(info.Env(), static_cast<size_t>(t->numel()));
      t->read_f32(out.Data());
      return out;
    });
  }

  class ReadWorker : public Napi::AsyncWorker {
   public:
    ReadWorker(Napi::Env env, std::shared_ptr<Tensor> t)
        : Napi::AsyncWorker(env),
          tensor_(std::move(t)),
          deferred_(Napi::Promise::Deferred::New(env)) {}
    Napi::Promise promise() { return deferred_.Promise(); }
    void Execute() override {
      try {
        check_host_copy(static_cast<size_t>(tensor_->numel()));
        values_.resize(static_cast<size_t>(tensor_->numel()));
        tensor_->read_f32(values_.data());
      } catch (const Error& e) {
        code_ = e.code();
        SetError(e.what());
      } catch (const std::bad_alloc&) {
        code_ = code::kOutOfMemory;
        SetError("out of host memory");
      }
    }
    void OnOK() override {
      Napi::Float32Array out = Napi::Float32Array::New(Env(), values_.size());
      std::copy(values_.begin(), values_.end(), out.Data());
      deferred_.Resolve(out);
    }
    void OnError(const Napi::Error& e) override {
      deferred_.Reject(make_error(Env(), code_, e.Message()).Value());
    }

   private:
    std::shared_ptr<Tensor> tensor_;  // keeps the buffer alive even if disposed meanwhile
    Napi::Promise::Deferred deferred_;
    std::vector<float> values_;
    const char* code_ = code::kNative;
  };

  Napi::Value Read(const Napi::CallbackInfo& info) {
    return guard(info.Env(), [&]() -> Napi::Value {
      get();
      auto* w = new ReadWorker(info.Env(), tensor_);
      Napi::Promise p = w->promise();
      w->Queue();
      return p;
    });
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    tensor_.reset();
    return info.Env().Undefined();
  }

  std::shared_ptr<Tensor> tensor_;
};

}  // namespace

Tensor* unwrap_tensor(const Napi::Value& v, const char* name) {
  // A type tag, not instanceof: it cannot be forged from JavaScript (a prototype swap fools
  // instanceof) and it is far cheaper, which matters on the decode path (five per call).
  TRIMKV_CHECK(v.IsObject() && v.As<Napi::Object>().CheckTypeTag(&kTensorTag),
               code::kInvalidArgument, "Expected a Tensor for ", name);
  return TensorWrap::Unwrap(v.As<Napi::Object>())->get();
}

void register_tensor(Napi::Env env, Napi::Object exports, addon_data_t* data) {
  Napi::Function ctor = TensorWrap::Define(env);
  data->tensor_ctor = Napi::Persistent(ctor);
  exports.Set("NativeTensor", ctor);
}

}  // namespace trimkv::napi
