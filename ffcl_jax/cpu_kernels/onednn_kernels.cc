// oneDNN convolutions and BatchNorm for XLA:CPU, called through the XLA FFI.
//
// Every handler takes and returns plain float32 buffers in the layouts JAX uses (activations
// NHWC, convolution weights HWIO with the groups outermost in O, as flax.nnx.Conv stores them):
// no layout leaves this file. Inside, each primitive gets the weight layout oneDNN prefers
// (weights are small, reordered per call) and works on NHWC activations directly.
//
// Primitives are built once per shape and kept (oneDNN's own primitive cache would still pay for
// the primitive-descriptor search on every call). The scratchpad is the caller's: XLA may run
// two of these handlers at once on its thread pool, and oneDNN's library-managed scratchpad is
// shared between primitives.

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Thread-local buffers, grown on demand: the scratchpad and reordered weights of one call.
struct ThreadBuffers {
  std::vector<uint8_t> scratchpad;
  std::vector<uint8_t> weights;
};

void* Grow(std::vector<uint8_t>& buffer, size_t bytes) {
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

ThreadBuffers& Buffers() {
  thread_local ThreadBuffers buffers;
  return buffers;
}

// One oneDNN primitive runs at a time, on all of OpenMP's threads. XLA:CPU runs independent ops
// concurrently on its own pool; two handlers there would each start an OpenMP team, twice as
// many busy threads as cores, and OpenMP's spinning barriers slow to a crawl when oversubscribed.
std::mutex& ExecutionLock() {
  static std::mutex lock;
  return lock;
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

template <typename Plan>
class PlanCache {
 public:
  template <typename Make>
  Plan& Get(const std::vector<int64_t>& key, Make make) {
    std::string bytes(reinterpret_cast<const char*>(key.data()), key.size() * sizeof(int64_t));
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = plans_.find(bytes);
    if (it == plans_.end()) it = plans_.emplace(bytes, std::make_unique<Plan>(make())).first;
    return *it->second;
  }

 private:
  std::mutex mutex_;
  std::unordered_map<std::string, std::unique_ptr<Plan>> plans_;
};

// ---------------------------------------------------------------------------------------------
// Convolution

struct ConvGeometry {
  int64_t n, ih, iw, ic, oh, ow, oc, kh, kw, sh, sw, pt, pb, pl, pr, groups;

  std::vector<int64_t> Key() const {
    return {n, ih, iw, ic, oh, ow, oc, kh, kw, sh, sw, pt, pb, pl, pr, groups};
  }
  memory::desc Src() const {
    return memory::desc({n, ic, ih, iw}, memory::data_type::f32, Tag::nhwc);
  }
  memory::desc Dst() const {
    return memory::desc({n, oc, oh, ow}, memory::data_type::f32, Tag::nhwc);
  }
  memory::dims WeightDims() const {
    if (groups == 1) return {oc, ic, kh, kw};
    return {groups, oc / groups, ic / groups, kh, kw};
  }
  memory::desc UserWeights() const {
    return memory::desc(WeightDims(), memory::data_type::f32, groups == 1 ? Tag::hwio : Tag::hwigo);
  }
  memory::desc AnyWeights() const {
    return memory::desc(WeightDims(), memory::data_type::f32, Tag::any);
  }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims PadLow() const { return {pt, pl}; }
  memory::dims PadHigh() const { return {pb, pr}; }

  dnnl::convolution_forward::primitive_desc Forward(const dnnl::primitive_attr& attr) const {
    return dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, Src(),
        AnyWeights(), Dst(), Strides(), PadLow(), PadHigh(), attr);
  }
};

ffi::Error ConvGeometryOf(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w, int64_t oh,
                          int64_t ow, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                          int64_t pr, int64_t groups, ConvGeometry* g) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 4) {
    return ffi::Error::InvalidArgument("onednn conv: expects NHWC input and HWIO weights");
  }
  if (groups < 1 || xd[3] != wd[2] * groups || wd[3] % groups != 0) {
    return ffi::Error::InvalidArgument("onednn conv: channel counts do not match the groups");
  }
  *g = ConvGeometry{xd[0], xd[1], xd[2], xd[3], oh, ow, wd[3], wd[0], wd[1],
                    sh,    sw,    pt,    pb,    pl, pr, groups};
  return ffi::Error::Success();
}

struct ConvForwardPlan {
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward primitive;
  dnnl::reorder weights_reorder;  // user HWIO -> the primitive's weights, if they differ
  bool reorder_weights;
  memory::desc user_weights;
};

struct ConvBackwardDataPlan {
  dnnl::convolution_backward_data::primitive_desc pd;
  dnnl::convolution_backward_data primitive;
  dnnl::reorder weights_reorder;
  bool reorder_weights;
  memory::desc user_weights;
};

struct ConvBackwardWeightsPlan {
  dnnl::convolution_backward_weights::primitive_desc pd;
  dnnl::convolution_backward_weights primitive;
  dnnl::reorder weights_reorder;  // the primitive's weight gradient -> user HWIO
  bool reorder_weights;
  memory::desc user_weights;
};

// The weights the primitive reads: the user's, or a reordered copy in this thread's buffer.
memory WeightsFor(const memory::desc& wanted, const memory::desc& user, bool reorder,
                  const dnnl::reorder& reorder_primitive, float* user_data,
                  dnnl::stream& stream) {
  memory user_memory(user, Engine(), user_data);
  if (!reorder) return user_memory;
  memory reordered(wanted, Engine(), Grow(Buffers().weights, wanted.get_size()));
  reorder_primitive.execute(stream, user_memory, reordered);
  return reordered;
}

template <typename Plan>
void SetWeightsReorder(Plan& plan, const memory::desc& primitive_weights, bool to_user) {
  plan.reorder_weights = primitive_weights != plan.user_weights;
  if (!plan.reorder_weights) return;
  plan.weights_reorder = to_user
      ? dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), primitive_weights, Engine(),
                                                    plan.user_weights))
      : dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), plan.user_weights, Engine(),
                                                    primitive_weights));
}

ffi::Error ConvForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                           int64_t pb, int64_t pl, int64_t pr, int64_t groups) {
  auto yd = y->dimensions();
  ConvGeometry g;
  if (auto e = ConvGeometryOf(x, w, yd[1], yd[2], sh, sw, pt, pb, pl, pr, groups, &g);
      e.failure()) {
    return e;
  }
  static PlanCache<ConvForwardPlan> cache;
  ConvForwardPlan& plan = cache.Get(g.Key(), [&] {
    ConvForwardPlan p;
    p.pd = g.Forward(UserScratchpad());
    p.primitive = dnnl::convolution_forward(p.pd);
    p.user_weights = g.UserWeights();
    SetWeightsReorder(p, p.pd.weights_desc(), /*to_user=*/false);
    return p;
  });
  std::lock_guard<std::mutex> serial(ExecutionLock());
  dnnl::stream stream(Engine());
  memory weights = WeightsFor(plan.pd.weights_desc(), plan.user_weights, plan.reorder_weights,
                              plan.weights_reorder, w.typed_data(), stream);
  memory scratch(plan.pd.scratchpad_desc(), Engine(),
                 Grow(Buffers().scratchpad, plan.pd.scratchpad_desc().get_size()));
  plan.primitive.execute(stream, {{DNNL_ARG_SRC, memory(g.Src(), Engine(), x.typed_data())},
                                  {DNNL_ARG_WEIGHTS, weights},
                                  {DNNL_ARG_DST, memory(g.Dst(), Engine(), y->typed_data())},
                                  {DNNL_ARG_SCRATCHPAD, scratch}});
  stream.wait();
  return ffi::Error::Success();
}

ffi::Error ConvBackwardDataImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                                ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw,
                                int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t groups) {
  auto dyd = dy.dimensions();
  auto dxd = dx->dimensions();
  auto wd = w.dimensions();
  if (dyd.size() != 4 || dxd.size() != 4 || wd.size() != 4 || dxd[3] != wd[2] * groups) {
    return ffi::Error::InvalidArgument("onednn conv backward data: shapes do not match");
  }
  ConvGeometry g{dxd[0], dxd[1], dxd[2], dxd[3], dyd[1], dyd[2], dyd[3], wd[0], wd[1],
                 sh,     sw,     pt,     pb,     pl,     pr,     groups};
  static PlanCache<ConvBackwardDataPlan> cache;
  ConvBackwardDataPlan& plan = cache.Get(g.Key(), [&] {
    ConvBackwardDataPlan p;
    auto hint = g.Forward(dnnl::primitive_attr());
    p.pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(), g.Dst(),
        g.Strides(), g.PadLow(), g.PadHigh(), hint, UserScratchpad());
    p.primitive = dnnl::convolution_backward_data(p.pd);
    p.user_weights = g.UserWeights();
    SetWeightsReorder(p, p.pd.weights_desc(), /*to_user=*/false);
    return p;
  });
  std::lock_guard<std::mutex> serial(ExecutionLock());
  dnnl::stream stream(Engine());
  memory weights = WeightsFor(plan.pd.weights_desc(), plan.user_weights, plan.reorder_weights,
                              plan.weights_reorder, w.typed_data(), stream);
  memory scratch(plan.pd.scratchpad_desc(), Engine(),
                 Grow(Buffers().scratchpad, plan.pd.scratchpad_desc().get_size()));
  plan.primitive.execute(stream,
                         {{DNNL_ARG_DIFF_DST, memory(g.Dst(), Engine(), dy.typed_data())},
                          {DNNL_ARG_WEIGHTS, weights},
                          {DNNL_ARG_DIFF_SRC, memory(g.Src(), Engine(), dx->typed_data())},
                          {DNNL_ARG_SCRATCHPAD, scratch}});
  stream.wait();
  return ffi::Error::Success();
}

ffi::Error ConvBackwardWeightsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                   ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw,
                                   int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                                   int64_t groups) {
  auto dyd = dy.dimensions();
  ConvGeometry g;
  ffi::Buffer<ffi::F32> dw_view = *dw;
  if (auto e = ConvGeometryOf(x, dw_view, dyd[1], dyd[2], sh, sw, pt, pb, pl, pr, groups, &g);
      e.failure()) {
    return e;
  }
  static PlanCache<ConvBackwardWeightsPlan> cache;
  ConvBackwardWeightsPlan& plan = cache.Get(g.Key(), [&] {
    ConvBackwardWeightsPlan p;
    auto hint = g.Forward(dnnl::primitive_attr());
    p.pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(), g.Dst(),
        g.Strides(), g.PadLow(), g.PadHigh(), hint, UserScratchpad());
    p.primitive = dnnl::convolution_backward_weights(p.pd);
    p.user_weights = g.UserWeights();
    SetWeightsReorder(p, p.pd.diff_weights_desc(), /*to_user=*/true);
    return p;
  });
  std::lock_guard<std::mutex> serial(ExecutionLock());
  dnnl::stream stream(Engine());
  memory user_dw(plan.user_weights, Engine(), dw->typed_data());
  memory primitive_dw =
      plan.reorder_weights
          ? memory(plan.pd.diff_weights_desc(), Engine(),
                   Grow(Buffers().weights, plan.pd.diff_weights_desc().get_size()))
          : user_dw;
  memory scratch(plan.pd.scratchpad_desc(), Engine(),
                 Grow(Buffers().scratchpad, plan.pd.scratchpad_desc().get_size()));
  plan.primitive.execute(stream, {{DNNL_ARG_SRC, memory(g.Src(), Engine(), x.typed_data())},
                                  {DNNL_ARG_DIFF_DST, memory(g.Dst(), Engine(), dy.typed_data())},
                                  {DNNL_ARG_DIFF_WEIGHTS, primitive_dw},
                                  {DNNL_ARG_SCRATCHPAD, scratch}});
  if (plan.reorder_weights) plan.weights_reorder.execute(stream, primitive_dw, user_dw);
  stream.wait();
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// BatchNorm in training mode, over every axis but the last (channels) of an NHWC tensor.

struct BatchNormGeometry {
  int64_t n, h, w, c;
  float epsilon;

  std::vector<int64_t> Key() const {
    int64_t eps_bits = 0;
    std::memcpy(&eps_bits, &epsilon, sizeof(epsilon));
    return {n, h, w, c, eps_bits};
  }
  memory::desc Data() const {
    return memory::desc({n, c, h, w}, memory::data_type::f32, Tag::nhwc);
  }
  memory::desc Channels() const { return memory::desc({c}, memory::data_type::f32, Tag::a); }
  dnnl::normalization_flags Flags() const {
    return dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
  }
  dnnl::batch_normalization_forward::primitive_desc Forward(
      const dnnl::primitive_attr& attr) const {
    return dnnl::batch_normalization_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training, Data(), Data(), epsilon, Flags(), attr);
  }
};

ffi::Error BatchNormGeometryOf(ffi::Buffer<ffi::F32>& x, float epsilon, BatchNormGeometry* g) {
  auto d = x.dimensions();
  if (d.size() == 4) {
    *g = BatchNormGeometry{d[0], d[1], d[2], d[3], epsilon};
  } else if (d.size() == 2) {
    *g = BatchNormGeometry{d[0], 1, 1, d[1], epsilon};
  } else {
    return ffi::Error::InvalidArgument("onednn batch norm: expects an NHWC or NC tensor");
  }
  return ffi::Error::Success();
}

struct BatchNormForwardPlan {
  dnnl::batch_normalization_forward::primitive_desc pd;
  dnnl::batch_normalization_forward primitive;
};

struct BatchNormBackwardPlan {
  dnnl::batch_normalization_backward::primitive_desc pd;
  dnnl::batch_normalization_backward primitive;
};

ffi::Error BatchNormForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                                ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> y,
                                ffi::ResultBuffer<ffi::F32> mean,
                                ffi::ResultBuffer<ffi::F32> variance, float epsilon) {
  BatchNormGeometry g;
  if (auto e = BatchNormGeometryOf(x, epsilon, &g); e.failure()) return e;
  static PlanCache<BatchNormForwardPlan> cache;
  BatchNormForwardPlan& plan = cache.Get(g.Key(), [&] {
    BatchNormForwardPlan p;
    p.pd = g.Forward(UserScratchpad());
    p.primitive = dnnl::batch_normalization_forward(p.pd);
    return p;
  });
  std::lock_guard<std::mutex> serial(ExecutionLock());
  dnnl::stream stream(Engine());
  memory scratch(plan.pd.scratchpad_desc(), Engine(),
                 Grow(Buffers().scratchpad, plan.pd.scratchpad_desc().get_size()));
  plan.primitive.execute(
      stream, {{DNNL_ARG_SRC, memory(g.Data(), Engine(), x.typed_data())},
               {DNNL_ARG_SCALE, memory(g.Channels(), Engine(), scale.typed_data())},
               {DNNL_ARG_SHIFT, memory(g.Channels(), Engine(), shift.typed_data())},
               {DNNL_ARG_DST, memory(g.Data(), Engine(), y->typed_data())},
               {DNNL_ARG_MEAN, memory(g.Channels(), Engine(), mean->typed_data())},
               {DNNL_ARG_VARIANCE, memory(g.Channels(), Engine(), variance->typed_data())},
               {DNNL_ARG_SCRATCHPAD, scratch}});
  stream.wait();
  return ffi::Error::Success();
}

ffi::Error BatchNormBackwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                 ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> variance,
                                 ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> dx,
                                 ffi::ResultBuffer<ffi::F32> dscale,
                                 ffi::ResultBuffer<ffi::F32> dshift, float epsilon) {
  BatchNormGeometry g;
  if (auto e = BatchNormGeometryOf(x, epsilon, &g); e.failure()) return e;
  static PlanCache<BatchNormBackwardPlan> cache;
  BatchNormBackwardPlan& plan = cache.Get(g.Key(), [&] {
    BatchNormBackwardPlan p;
    auto hint = g.Forward(dnnl::primitive_attr());
    p.pd = dnnl::batch_normalization_backward::primitive_desc(
        Engine(), dnnl::prop_kind::backward, g.Data(), g.Data(), g.Data(), epsilon, g.Flags(),
        hint, UserScratchpad());
    p.primitive = dnnl::batch_normalization_backward(p.pd);
    return p;
  });
  std::lock_guard<std::mutex> serial(ExecutionLock());
  dnnl::stream stream(Engine());
  memory scratch(plan.pd.scratchpad_desc(), Engine(),
                 Grow(Buffers().scratchpad, plan.pd.scratchpad_desc().get_size()));
  plan.primitive.execute(
      stream, {{DNNL_ARG_SRC, memory(g.Data(), Engine(), x.typed_data())},
               {DNNL_ARG_DIFF_DST, memory(g.Data(), Engine(), dy.typed_data())},
               {DNNL_ARG_MEAN, memory(g.Channels(), Engine(), mean.typed_data())},
               {DNNL_ARG_VARIANCE, memory(g.Channels(), Engine(), variance.typed_data())},
               {DNNL_ARG_SCALE, memory(g.Channels(), Engine(), scale.typed_data())},
               {DNNL_ARG_DIFF_SRC, memory(g.Data(), Engine(), dx->typed_data())},
               {DNNL_ARG_DIFF_SCALE, memory(g.Channels(), Engine(), dscale->typed_data())},
               {DNNL_ARG_DIFF_SHIFT, memory(g.Channels(), Engine(), dshift->typed_data())},
               {DNNL_ARG_SCRATCHPAD, scratch}});
  stream.wait();
  return ffi::Error::Success();
}

// oneDNN reports failures as exceptions; XLA's FFI wants an error value.
template <typename Fn>
ffi::Error Guarded(Fn fn) {
  try {
    return fn();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(e.what());
  }
}

}  // namespace

// A handler symbol that runs `impl` under `Guarded`.
#define FFCL_HANDLER(symbol, impl, binding)                                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                        \
      symbol, [](auto... args) { return Guarded([&] { return impl(args...); }); }, binding)

// The three convolution passes take two float32 buffers and return one, with the geometry.
#define FFCL_CONV_BINDING                                                                \
  ffi::Ffi::Bind()                                                                      \
      .Arg<ffi::Buffer<ffi::F32>>()                                                     \
      .Arg<ffi::Buffer<ffi::F32>>()                                                     \
      .Ret<ffi::Buffer<ffi::F32>>()                                                     \
      .Attr<int64_t>("stride_h")                                                        \
      .Attr<int64_t>("stride_w")                                                        \
      .Attr<int64_t>("pad_top")                                                         \
      .Attr<int64_t>("pad_bottom")                                                      \
      .Attr<int64_t>("pad_left")                                                        \
      .Attr<int64_t>("pad_right")                                                       \
      .Attr<int64_t>("groups")

FFCL_HANDLER(FfclConvForward, ConvForwardImpl, FFCL_CONV_BINDING);
FFCL_HANDLER(FfclConvBackwardData, ConvBackwardDataImpl, FFCL_CONV_BINDING);
FFCL_HANDLER(FfclConvBackwardWeights, ConvBackwardWeightsImpl, FFCL_CONV_BINDING);

FFCL_HANDLER(
    FfclBatchNormForward, BatchNormForwardImpl,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<float>("epsilon"));

FFCL_HANDLER(
    FfclBatchNormBackward, BatchNormBackwardImpl,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<float>("epsilon"));
