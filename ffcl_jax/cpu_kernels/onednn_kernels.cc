// oneDNN convolutions, and a BatchNorm of our own, for XLA:CPU, called through the XLA FFI.
//
// Every handler takes and returns plain float32 buffers in the layouts JAX uses (activations
// NHWC, convolution weights HWIO with the groups outermost in O, as flax.nnx.Conv stores them):
// no layout leaves this file. Inside, each primitive gets the weight layout oneDNN prefers
// (weights are small, reordered per call) and works on NHWC activations directly.
//
// Primitives are built once per shape and thread count and kept, the most recently used
// max_plans of each pass (oneDNN's own primitive cache would still pay for the
// primitive-descriptor search on every call). The scratchpad is the caller's (oneDNN's
// library-managed one is shared between primitives).
//
// All handlers' work runs on one thread of the library's own (KernelThread), so one thread opens
// every OpenMP region whichever of XLA's threads calls.
//
// XLA checks each buffer's element type against the binding and nothing else: every handler
// checks every buffer's rank and dimensions against the others, and its attributes, before it
// reads a dimension or touches memory, and returns InvalidArgument naming the target and the
// shapes.

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <list>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;

namespace {

using Dims = ffi::Span<const int64_t>;

std::string ShapeOf(Dims d) {
  std::string text = "[";
  for (size_t i = 0; i < d.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(d[i]);
  }
  return text + "]";
}

bool AllPositive(Dims d) {
  return std::all_of(d.begin(), d.end(), [](int64_t v) { return v >= 1; });
}

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A thread's scratch memory, grown on demand, 64-byte aligned: oneDNN's kernels read and write
// the scratchpad and reordered weights in whole cache lines and AVX-512 vectors, and malloc (so
// std::vector) aligns to 16 bytes only.
class AlignedBuffer {
 public:
  static constexpr size_t kAlignment = 64;

  void* Reserve(size_t bytes) {
    if (bytes > size_) {
      size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
      void* fresh = std::aligned_alloc(kAlignment, rounded);
      if (fresh == nullptr) throw std::bad_alloc();
      data_.reset(fresh);
      size_ = rounded;
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> data_;
  size_t size_ = 0;
};

// The scratchpad and reordered weights of one call.
struct ThreadBuffers {
  AlignedBuffer scratchpad;
  AlignedBuffer weights;
};

ThreadBuffers& Buffers() {
  thread_local ThreadBuffers buffers;
  return buffers;
}

// One oneDNN primitive runs at a time, on all of OpenMP's threads. Handlers run one at a time on
// the KernelThread anyway; with it switched off, XLA:CPU runs independent ops concurrently on its
// own pool, and two handlers there would each start an OpenMP team, twice as many busy threads
// as cores, and OpenMP's spinning barriers slow to a crawl when oversubscribed.
std::mutex& ExecutionLock() {
  static std::mutex lock;
  return lock;
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// The most primitives each pass keeps: a program whose shapes keep changing (another batch size
// on every call) must not grow the process without bound. A train step of two networks needs
// a few dozen.
std::atomic<size_t> max_plans{256};

// Primitives by key, the least recently used dropped first. The key holds OpenMP's thread count:
// a oneDNN primitive splits its work for the thread count it was created with and must run with
// that count. Plans are shared, so one dropped while another thread runs it lives until it ends.
template <typename Plan>
class PlanCache {
 public:
  template <typename Make>
  std::shared_ptr<Plan> Get(std::vector<int64_t> key, Make make) {
    key.push_back(omp_get_max_threads());
    std::string bytes(reinterpret_cast<const char*>(key.data()), key.size() * sizeof(int64_t));
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = index_.find(bytes);
    if (found != index_.end()) {
      order_.splice(order_.begin(), order_, found->second);
      return found->second->second;
    }
    auto plan = std::make_shared<Plan>(make());
    order_.emplace_front(bytes, plan);
    index_.emplace(std::move(bytes), order_.begin());
    Trim();
    return plan;
  }

  size_t Size() {
    std::lock_guard<std::mutex> lock(mutex_);
    Trim();
    return order_.size();
  }

 private:
  using Entry = std::pair<std::string, std::shared_ptr<Plan>>;

  void Trim() {
    const size_t limit = std::max<size_t>(1, max_plans.load());
    while (order_.size() > limit) {
      index_.erase(order_.back().first);
      order_.pop_back();
    }
  }

  std::mutex mutex_;
  std::list<Entry> order_;
  std::unordered_map<std::string, typename std::list<Entry>::iterator> index_;
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

  dnnl::convolution_forward::primitive_desc Forward(
      const dnnl::primitive_attr& attr,
      dnnl::prop_kind kind = dnnl::prop_kind::forward_training) const {
    return dnnl::convolution_forward::primitive_desc(Engine(), kind,
                                                     dnnl::algorithm::convolution_direct, Src(),
                                                     AnyWeights(), Dst(), Strides(), PadLow(),
                                                     PadHigh(), attr);
  }
};

// A convolution's attributes, as every pass takes them.
struct ConvAttrs {
  int64_t sh, sw, pt, pb, pl, pr, groups;
};

// Attributes larger than this are no convolution's, and would overflow the arithmetic below.
constexpr int64_t kMaxAttr = int64_t{1} << 31;

// The geometry of the convolution `y = conv(x, w)` that a pass computes, after checking that
// its three buffers are one convolution's: `x` NHWC, `w` HWIO, `y` NHWC, every dimension at
// least 1, x's channels = w's inputs x groups, w's outputs a multiple of groups, y's batch and
// channels x's and w's, y's height and width what the strides and padding give. `names` are
// the pass's names for x, w and y (the backward passes compute one of them from the others).
ffi::Error CheckedGeometry(const char* target, const char* const names[3], Dims xd, Dims wd,
                           Dims yd, const ConvAttrs& a, ConvGeometry* g) {
  auto fail = [&](const std::string& problem) {
    return ffi::Error::InvalidArgument(
        std::string(target) + ": " + problem + " (" + names[0] + " " + ShapeOf(xd) + ", " +
        names[1] + " " + ShapeOf(wd) + ", " + names[2] + " " + ShapeOf(yd) + ", strides " +
        std::to_string(a.sh) + "x" + std::to_string(a.sw) + ", padding (" +
        std::to_string(a.pt) + ", " + std::to_string(a.pb) + ")x(" + std::to_string(a.pl) + ", " +
        std::to_string(a.pr) + "), groups " + std::to_string(a.groups) + ")");
  };
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4) {
    return fail(std::string("expects rank-4 buffers: ") + names[0] + " NHWC, " + names[1] +
                " HWIO, " + names[2] + " NHWC");
  }
  if (!AllPositive(xd) || !AllPositive(wd) || !AllPositive(yd)) {
    return fail("every dimension must be at least 1");
  }
  if (a.groups < 1 || a.groups > kMaxAttr) return fail("groups must be in [1, 2^31]");
  if (a.sh < 1 || a.sw < 1 || a.sh > kMaxAttr || a.sw > kMaxAttr) {
    return fail("strides must be in [1, 2^31]");
  }
  for (int64_t pad : {a.pt, a.pb, a.pl, a.pr}) {
    if (pad < 0 || pad > kMaxAttr) return fail("padding must be in [0, 2^31]");
  }
  if (xd[3] % a.groups != 0 || xd[3] / a.groups != wd[2]) {
    return fail(std::string(names[0]) + "'s channels must be " + names[1] +
                "'s input channels times groups");
  }
  if (wd[3] % a.groups != 0) {
    return fail(std::string(names[1]) + "'s output channels must be a multiple of groups");
  }
  if (yd[0] != xd[0]) {
    return fail(std::string(names[2]) + "'s batch must be " + names[0] + "'s");
  }
  if (yd[3] != wd[3]) {
    return fail(std::string(names[2]) + "'s channels must be " + names[1] +
                "'s output channels");
  }
  const int64_t padded_h = xd[1] + a.pt + a.pb, padded_w = xd[2] + a.pl + a.pr;
  if (padded_h < wd[0] || padded_w < wd[1]) {
    return fail(std::string("the kernel is larger than the padded ") + names[0]);
  }
  const int64_t oh = (padded_h - wd[0]) / a.sh + 1, ow = (padded_w - wd[1]) / a.sw + 1;
  if (yd[1] != oh || yd[2] != ow) {
    return fail(std::string(names[2]) + "'s height and width must be " + std::to_string(oh) +
                "x" + std::to_string(ow) + ", as the strides and padding give");
  }
  *g = ConvGeometry{xd[0], xd[1], xd[2], xd[3], oh,   ow,   wd[3], wd[0],
                    wd[1], a.sh,  a.sw,  a.pt,  a.pb, a.pl, a.pr,  a.groups};
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

PlanCache<ConvForwardPlan>& ForwardPlans() {
  static PlanCache<ConvForwardPlan> cache;
  return cache;
}

PlanCache<ConvBackwardDataPlan>& BackwardDataPlans() {
  static PlanCache<ConvBackwardDataPlan> cache;
  return cache;
}

PlanCache<ConvBackwardWeightsPlan>& BackwardWeightsPlans() {
  static PlanCache<ConvBackwardWeightsPlan> cache;
  return cache;
}

// The weights the primitive reads: the user's, or a reordered copy in this thread's buffer.
memory WeightsFor(const memory::desc& wanted, const memory::desc& user, bool reorder,
                  const dnnl::reorder& reorder_primitive, float* user_data,
                  dnnl::stream& stream) {
  memory user_memory(user, Engine(), user_data);
  if (!reorder) return user_memory;
  memory reordered(wanted, Engine(), Buffers().weights.Reserve(wanted.get_size()));
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

// The forward pass of training (`kInference` false: what the backward passes were planned
// with) or of inference (oneDNN may pick another implementation for it).
template <bool kInference>
ffi::Error ConvForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                           int64_t pb, int64_t pl, int64_t pr, int64_t groups) {
  static const char* const kNames[3] = {"x", "w", "y"};
  const char* target = kInference ? "ffcl_onednn_conv_inference" : "ffcl_onednn_conv_forward";
  ConvGeometry g;
  if (auto e = CheckedGeometry(target, kNames, x.dimensions(), w.dimensions(), y->dimensions(),
                               {sh, sw, pt, pb, pl, pr, groups}, &g);
      e.failure()) {
    return e;
  }
  std::vector<int64_t> key = g.Key();
  key.push_back(kInference ? 1 : 0);
  std::shared_ptr<ConvForwardPlan> shared = ForwardPlans().Get(std::move(key), [&] {
    ConvForwardPlan p;
    p.pd = g.Forward(UserScratchpad(), kInference ? dnnl::prop_kind::forward_inference
                                                  : dnnl::prop_kind::forward_training);
    p.primitive = dnnl::convolution_forward(p.pd);
    p.user_weights = g.UserWeights();
    SetWeightsReorder(p, p.pd.weights_desc(), /*to_user=*/false);
    return p;
  });
  ConvForwardPlan& plan = *shared;
  std::lock_guard<std::mutex> serial(ExecutionLock());
  dnnl::stream stream(Engine());
  memory weights = WeightsFor(plan.pd.weights_desc(), plan.user_weights, plan.reorder_weights,
                              plan.weights_reorder, w.typed_data(), stream);
  memory scratch(plan.pd.scratchpad_desc(), Engine(),
                 Buffers().scratchpad.Reserve(plan.pd.scratchpad_desc().get_size()));
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
  static const char* const kNames[3] = {"dx", "w", "dy"};
  ConvGeometry g;
  if (auto e = CheckedGeometry("ffcl_onednn_conv_backward_data", kNames, dx->dimensions(),
                               w.dimensions(), dy.dimensions(), {sh, sw, pt, pb, pl, pr, groups},
                               &g);
      e.failure()) {
    return e;
  }
  std::shared_ptr<ConvBackwardDataPlan> shared = BackwardDataPlans().Get(g.Key(), [&] {
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
  ConvBackwardDataPlan& plan = *shared;
  std::lock_guard<std::mutex> serial(ExecutionLock());
  dnnl::stream stream(Engine());
  memory weights = WeightsFor(plan.pd.weights_desc(), plan.user_weights, plan.reorder_weights,
                              plan.weights_reorder, w.typed_data(), stream);
  memory scratch(plan.pd.scratchpad_desc(), Engine(),
                 Buffers().scratchpad.Reserve(plan.pd.scratchpad_desc().get_size()));
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
  static const char* const kNames[3] = {"x", "dw", "dy"};
  ConvGeometry g;
  if (auto e = CheckedGeometry("ffcl_onednn_conv_backward_weights", kNames, x.dimensions(),
                               dw->dimensions(), dy.dimensions(), {sh, sw, pt, pb, pl, pr, groups},
                               &g);
      e.failure()) {
    return e;
  }
  std::shared_ptr<ConvBackwardWeightsPlan> shared = BackwardWeightsPlans().Get(g.Key(), [&] {
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
  ConvBackwardWeightsPlan& plan = *shared;
  std::lock_guard<std::mutex> serial(ExecutionLock());
  dnnl::stream stream(Engine());
  memory user_dw(plan.user_weights, Engine(), dw->typed_data());
  memory primitive_dw =
      plan.reorder_weights
          ? memory(plan.pd.diff_weights_desc(), Engine(),
                   Buffers().weights.Reserve(plan.pd.diff_weights_desc().get_size()))
          : user_dw;
  memory scratch(plan.pd.scratchpad_desc(), Engine(),
                 Buffers().scratchpad.Reserve(plan.pd.scratchpad_desc().get_size()));
  plan.primitive.execute(stream, {{DNNL_ARG_SRC, memory(g.Src(), Engine(), x.typed_data())},
                                  {DNNL_ARG_DIFF_DST, memory(g.Dst(), Engine(), dy.typed_data())},
                                  {DNNL_ARG_DIFF_WEIGHTS, primitive_dw},
                                  {DNNL_ARG_SCRATCHPAD, scratch}});
  if (plan.reorder_weights) plan.weights_reorder.execute(stream, primitive_dw, user_dw);
  stream.wait();
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// BatchNorm in training mode (ReLU optionally fused), over every axis but the last (channels) of
// an NHWC or NC tensor, seen as `rows x channels`.
//
// Not oneDNN's: its BatchNorm sums each channel in plain float32, and a shift's gradient (a sum
// that nearly cancels) then comes out ~150x less exact than XLA's pairwise reductions. These sum
// in double, over fixed shares of the rows (one per thread), combined in share order: more exact
// than XLA's, and the same result for the same thread count. The loops are memory-bound; each
// is compiled for AVX-512, AVX2 and plain x86-64 and picked at load time.

#define FFCL_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// The row loops work on one block of at most kChannelBlock channels at a time, so that a
// block's accumulators and per-channel constants stay in registers; a block of exactly
// kChannelBlock channels (every layer of the zoo) is compiled with that width as a constant.
constexpr int64_t kChannelBlock = 16;

// Rows [begin, end) of channels [c0, c0 + width) of a `rows x c` array.
struct Block {
  int64_t begin, end, c, c0, width;
};

// A row loop's body is a template over its width: kChannelBlock, a compile-time constant, or 0
// (then it reads `b.width`). Each cloned entry point inlines both, compiled for its target.
#define FFCL_ALWAYS_INLINE inline __attribute__((always_inline))
#define FFCL_BY_WIDTH(body, b, ...) \
  ((b).width == kChannelBlock ? body<kChannelBlock>(b, __VA_ARGS__) : body<0>(b, __VA_ARGS__))

// The float32 value BatchNorm computes before its ReLU, exactly as both passes round it.
FFCL_ALWAYS_INLINE float Normalized(float x, float mean, float a, float b) {
  return (x - mean) * a + b;
}

// `value` where `keep`, else +0, without a branch (g++ leaves a loop with a select scalar).
FFCL_ALWAYS_INLINE float KeptIf(float value, bool keep) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits &= -static_cast<uint32_t>(keep);
  std::memcpy(&value, &bits, sizeof(bits));
  return value;
}

template <int64_t W>
FFCL_ALWAYS_INLINE void SumBody(const Block& b, const float* __restrict x, double* __restrict sum,
                                double* __restrict square) {
  const int64_t n = W ? W : b.width;
  double s[kChannelBlock] = {}, q[kChannelBlock] = {};
  for (int64_t r = b.begin; r < b.end; ++r) {
    const float* row = x + r * b.c + b.c0;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      double v = row[k];
      s[k] += v;
      q[k] += v * v;
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    sum[k] += s[k];
    square[k] += q[k];
  }
}

// sum[k] += x and square[k] += x * x over the block's rows, in double.
FFCL_VECTOR_CLONES
void SumRows(const Block& b, const float* x, double* sum, double* square) {
  FFCL_BY_WIDTH(SumBody, b, x, sum, square);
}

template <int64_t W>
FFCL_ALWAYS_INLINE void NormalizeBody(const Block& b, const float* __restrict x,
                                      float* __restrict y, const float* __restrict mean,
                                      const float* __restrict a, const float* __restrict shift,
                                      float floor) {
  const int64_t n = W ? W : b.width;
  for (int64_t r = b.begin; r < b.end; ++r) {
    const float* in = x + r * b.c + b.c0;
    float* out = y + r * b.c + b.c0;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      out[k] = std::max(Normalized(in[k], mean[k], a[k], shift[k]), floor);
    }
  }
}

// y = max(Normalized(x), floor): floor 0 fuses the ReLU, -inf leaves y as it is. `mean`, `a`
// and `shift` start at the block's first channel.
FFCL_VECTOR_CLONES
void NormalizeRows(const Block& b, const float* x, float* y, const float* mean, const float* a,
                   const float* shift, float floor) {
  FFCL_BY_WIDTH(NormalizeBody, b, x, y, mean, a, shift, floor);
}

// Where the backward pass lets dy through, g = dy or 0. BatchNorm's own ReLU recomputes its
// mask from x as the forward pass rounded it (floor 0), or lets everything through (floor
// -inf); the residual block's fused end reads it off its output y (y > 0 exactly where the sum
// was: the sum itself would need the residual), and in the input-gradient pass writes g as the
// residual's gradient. `at` is the row's offset in the rows x channels arrays, `k` the channel
// in the block (the per-channel pointers start at the block's first channel).
struct ReluOfNormalized {
  const float *mean, *a, *shift;
  float floor;
  FFCL_ALWAYS_INLINE float operator()(float d, float x, int64_t, int64_t k) const {
    return KeptIf(d, Normalized(x, mean[k], a[k], shift[k]) > floor);
  }
};

struct ReluOfOutput {
  const float* y;
  float* residual_gradient;  // null in the sums' pass
  FFCL_ALWAYS_INLINE float operator()(float d, float, int64_t at, int64_t k) const {
    float g = KeptIf(d, y[at + k] > 0.0f);
    if (residual_gradient != nullptr) residual_gradient[at + k] = g;
    return g;
  }
};

template <int64_t W, typename Gate>
FFCL_ALWAYS_INLINE void GradientSumBody(const Block& b, const float* __restrict x,
                                        const float* __restrict dy, const float* __restrict mean,
                                        Gate gate, double* __restrict sum_g,
                                        double* __restrict sum_gx) {
  const int64_t n = W ? W : b.width;
  double s[kChannelBlock] = {}, q[kChannelBlock] = {};
  for (int64_t r = b.begin; r < b.end; ++r) {
    const int64_t at = r * b.c + b.c0;
    const float *xin = x + at, *din = dy + at;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      float g = gate(din[k], xin[k], at, k);
      s[k] += g;
      q[k] += static_cast<double>(g) * (static_cast<double>(xin[k]) - mean[k]);
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    sum_g[k] += s[k];
    sum_gx[k] += q[k];
  }
}

// The backward pass's sums in double: g and g * (x - mean), g as the gate lets dy through.
FFCL_VECTOR_CLONES
void GradientSumRows(const Block& b, const float* x, const float* dy, const float* mean,
                     ReluOfNormalized gate, double* sum_g, double* sum_gx) {
  FFCL_BY_WIDTH(GradientSumBody, b, x, dy, mean, gate, sum_g, sum_gx);
}

FFCL_VECTOR_CLONES
void GradientSumRows(const Block& b, const float* x, const float* dy, const float* mean,
                     ReluOfOutput gate, double* sum_g, double* sum_gx) {
  FFCL_BY_WIDTH(GradientSumBody, b, x, dy, mean, gate, sum_g, sum_gx);
}

template <int64_t W, typename Gate>
FFCL_ALWAYS_INLINE void InputGradientBody(const Block& b, const float* __restrict x,
                                          const float* __restrict dy, float* __restrict dx,
                                          const float* __restrict mean, Gate gate,
                                          const float* __restrict da,
                                          const float* __restrict db,
                                          const float* __restrict dc) {
  const int64_t n = W ? W : b.width;
  for (int64_t r = b.begin; r < b.end; ++r) {
    const int64_t at = r * b.c + b.c0;
    const float *xin = x + at, *din = dy + at;
    float* out = dx + at;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      float g = gate(din[k], xin[k], at, k);
      out[k] = da[k] * g + db[k] * (xin[k] - mean[k]) + dc[k];
    }
  }
}

// dx = da * g + db * (x - mean) + dc, g as in GradientSumRows.
FFCL_VECTOR_CLONES
void InputGradientRows(const Block& b, const float* x, const float* dy, float* dx,
                       const float* mean, ReluOfNormalized gate, const float* da,
                       const float* db, const float* dc) {
  FFCL_BY_WIDTH(InputGradientBody, b, x, dy, dx, mean, gate, da, db, dc);
}

FFCL_VECTOR_CLONES
void InputGradientRows(const Block& b, const float* x, const float* dy, float* dx,
                       const float* mean, ReluOfOutput gate, const float* da, const float* db,
                       const float* dc) {
  FFCL_BY_WIDTH(InputGradientBody, b, x, dy, dx, mean, gate, da, db, dc);
}

// The residual block's end, relu(residual + BatchNorm(x)), fused: the add and the ReLU cost no
// pass of their own over the block's output.
template <int64_t W>
FFCL_ALWAYS_INLINE void NormalizeAddBody(const Block& b, const float* __restrict x,
                                         const float* __restrict residual, float* __restrict y,
                                         const float* __restrict mean,
                                         const float* __restrict a,
                                         const float* __restrict shift) {
  const int64_t n = W ? W : b.width;
  for (int64_t r = b.begin; r < b.end; ++r) {
    const float* in = x + r * b.c + b.c0;
    const float* add = residual + r * b.c + b.c0;
    float* out = y + r * b.c + b.c0;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      out[k] = std::max(add[k] + Normalized(in[k], mean[k], a[k], shift[k]), 0.0f);
    }
  }
}

// y = max(residual + Normalized(x), 0).
FFCL_VECTOR_CLONES
void NormalizeAddRows(const Block& b, const float* x, const float* residual, float* y,
                      const float* mean, const float* a, const float* shift) {
  FFCL_BY_WIDTH(NormalizeAddBody, b, x, residual, y, mean, a, shift);
}

struct RowsView {
  int64_t rows, channels;
};

using Named = std::pair<const char*, Dims>;

// `x` (NHWC or NC) as rows x channels, after checking that every buffer in `like_x` has x's
// shape and every one in `per_channel` holds exactly one value per channel.
ffi::Error CheckedRows(const char* target, Dims xd, std::initializer_list<Named> like_x,
                       std::initializer_list<Named> per_channel, RowsView* view) {
  auto fail = [&](const std::string& problem) {
    std::string shapes = "x " + ShapeOf(xd);
    for (const auto& list : {like_x, per_channel}) {
      for (const Named& b : list) shapes += std::string(", ") + b.first + " " + ShapeOf(b.second);
    }
    return ffi::Error::InvalidArgument(std::string(target) + ": " + problem + " (" + shapes +
                                       ")");
  };
  if (xd.size() < 2) return fail("expects an NHWC or NC x");
  if (!AllPositive(xd)) return fail("every dimension of x must be at least 1");
  for (const Named& b : like_x) {
    if (!(b.second == xd)) return fail(std::string(b.first) + "'s shape must be x's");
  }
  const int64_t channels = xd[xd.size() - 1];
  for (const Named& b : per_channel) {
    if (b.second.size() != 1 || b.second[0] != channels) {
      return fail(std::string(b.first) + " must hold x's " + std::to_string(channels) +
                  " channels");
    }
  }
  view->channels = channels;
  view->rows = 1;
  for (size_t i = 0; i + 1 < xd.size(); ++i) view->rows *= xd[i];
  return ffi::Error::Success();
}

// The rows are split into Shares(v) contiguous shares, fixed before the parallel region: the
// team OpenMP hands out may be smaller than asked (OMP_DYNAMIC, nested regions), so each
// member takes shares t, t + n, ... of the n it actually got. Sums are kept per share and added
// in share order, so they depend on the share count (OpenMP's thread count) alone, never on the
// team's size.
int64_t Shares(const RowsView& v) {
  return std::clamp<int64_t>(v.rows, 1, std::max(1, omp_get_max_threads()));
}

// Runs `fn(block, share)` on every channel block of each of `shares` shares of the rows.
template <typename Fn>
void OverBlocks(const RowsView& v, int64_t shares, Fn fn) {
#pragma omp parallel num_threads(static_cast<int>(shares))
  {
    const int64_t team = omp_get_num_threads();
    for (int64_t s = omp_get_thread_num(); s < shares; s += team) {
      const int64_t begin = v.rows * s / shares, end = v.rows * (s + 1) / shares;
      for (int64_t c0 = 0; c0 < v.channels; c0 += kChannelBlock) {
        fn(Block{begin, end, v.channels, c0, std::min(kChannelBlock, v.channels - c0)}, s);
      }
    }
  }
}

// Two per-channel double sums over all rows: `fn(block, first, second)` adds a block's sums
// (pointers at the block's first channel) into its share's, which are added in share order.
template <typename Fn>
void ChannelSums(const RowsView& v, Fn fn, std::vector<double>* first,
                 std::vector<double>* second) {
  const int64_t c = v.channels, shares = Shares(v);
  std::vector<double> partial(static_cast<size_t>(shares) * 2 * c);
  OverBlocks(v, shares, [&](const Block& b, int64_t s) {
    double* mine = partial.data() + static_cast<size_t>(s) * 2 * c;
    fn(b, mine + b.c0, mine + c + b.c0);
  });
  first->assign(c, 0.0);
  second->assign(c, 0.0);
  for (int64_t s = 0; s < shares; ++s) {
    const double* mine = partial.data() + static_cast<size_t>(s) * 2 * c;
    for (int64_t k = 0; k < c; ++k) {
      (*first)[k] += mine[k];
      (*second)[k] += mine[c + k];
    }
  }
}

// 1 / sqrt(var + epsilon), in double, from the float32 variance both passes see.
double RsqrtOf(float variance, float epsilon) {
  return 1.0 / std::sqrt(static_cast<double>(variance) + epsilon);
}

// The per-channel factor `a` of `Normalized`. The backward pass recomputes the fused ReLU's mask
// from it, so both passes must get it from this one expression, bit for bit.
float NormalizingScale(float gamma, double rstd) { return static_cast<float>(gamma * rstd); }

// The batch's mean and biased variance of each channel, and `Normalized`'s factor `a`. Called
// under the execution lock.
std::vector<float> BatchStatistics(const RowsView& v, const float* xs, const float* gamma,
                                   float epsilon, float* m, float* var) {
  std::vector<double> sum, square;
  ChannelSums(
      v, [&](const Block& b, double* s, double* q) { SumRows(b, xs, s, q); }, &sum, &square);
  std::vector<float> a(v.channels);
  for (int64_t k = 0; k < v.channels; ++k) {
    double mk = sum[k] / v.rows;
    m[k] = static_cast<float>(mk);
    var[k] = static_cast<float>(std::max(square[k] / v.rows - mk * mk, 0.0));
    a[k] = NormalizingScale(gamma[k], RsqrtOf(var[k], epsilon));
  }
  return a;
}

ffi::Error BatchNormForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                                ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> y,
                                ffi::ResultBuffer<ffi::F32> mean,
                                ffi::ResultBuffer<ffi::F32> variance, float epsilon, bool relu) {
  RowsView v;
  if (auto e = CheckedRows("ffcl_batch_norm_forward", x.dimensions(), {{"y", y->dimensions()}},
                           {{"scale", scale.dimensions()},
                            {"shift", shift.dimensions()},
                            {"mean", mean->dimensions()},
                            {"variance", variance->dimensions()}},
                           &v);
      e.failure()) {
    return e;
  }
  const float floor = relu ? 0.0f : -INFINITY;  // the fused ReLU, or none
  const float *xs = x.typed_data(), *beta = shift.typed_data();
  float *ys = y->typed_data(), *m = mean->typed_data();
  std::lock_guard<std::mutex> serial(ExecutionLock());
  std::vector<float> a =
      BatchStatistics(v, xs, scale.typed_data(), epsilon, m, variance->typed_data());
  OverBlocks(v, Shares(v), [&](const Block& b, int64_t) {
    NormalizeRows(b, xs, ys, m + b.c0, a.data() + b.c0, beta + b.c0, floor);
  });
  return ffi::Error::Success();
}

ffi::Error BatchNormAddReluForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                                       ffi::Buffer<ffi::F32> shift,
                                       ffi::Buffer<ffi::F32> residual,
                                       ffi::ResultBuffer<ffi::F32> y,
                                       ffi::ResultBuffer<ffi::F32> mean,
                                       ffi::ResultBuffer<ffi::F32> variance, float epsilon) {
  RowsView v;
  if (auto e = CheckedRows("ffcl_batch_norm_add_relu_forward", x.dimensions(),
                           {{"residual", residual.dimensions()}, {"y", y->dimensions()}},
                           {{"scale", scale.dimensions()},
                            {"shift", shift.dimensions()},
                            {"mean", mean->dimensions()},
                            {"variance", variance->dimensions()}},
                           &v);
      e.failure()) {
    return e;
  }
  const float *xs = x.typed_data(), *beta = shift.typed_data(), *rs = residual.typed_data();
  float *ys = y->typed_data(), *m = mean->typed_data();
  std::lock_guard<std::mutex> serial(ExecutionLock());
  std::vector<float> a =
      BatchStatistics(v, xs, scale.typed_data(), epsilon, m, variance->typed_data());
  OverBlocks(v, Shares(v), [&](const Block& b, int64_t) {
    NormalizeAddRows(b, xs, rs, ys, m + b.c0, a.data() + b.c0, beta + b.c0);
  });
  return ffi::Error::Success();
}

// The backward pass's per-channel results from its two sums: dscale, dshift, and the factors of
// dx = da * g + db * (x - mean) + dc.
struct GradientFactors {
  std::vector<float> da, db, dc;
};

GradientFactors FactorsFromSums(const RowsView& v, const std::vector<double>& rstd,
                                const float* gamma, const std::vector<double>& sum_g,
                                const std::vector<double>& sum_gx, float* dscale,
                                float* dshift) {
  const int64_t c = v.channels;
  GradientFactors f{std::vector<float>(c), std::vector<float>(c), std::vector<float>(c)};
  for (int64_t k = 0; k < c; ++k) {
    double gr = gamma[k] * rstd[k];
    dscale[k] = static_cast<float>(sum_gx[k] * rstd[k]);
    dshift[k] = static_cast<float>(sum_g[k]);
    f.da[k] = static_cast<float>(gr);
    f.db[k] = static_cast<float>(-gr * rstd[k] * rstd[k] * sum_gx[k] / v.rows);
    f.dc[k] = static_cast<float>(-gr * sum_g[k] / v.rows);
  }
  return f;
}

std::vector<double> RstdOf(const RowsView& v, const float* variance, float epsilon) {
  std::vector<double> rstd(v.channels);
  for (int64_t k = 0; k < v.channels; ++k) rstd[k] = RsqrtOf(variance[k], epsilon);
  return rstd;
}

ffi::Error BatchNormBackwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                 ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> variance,
                                 ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                                 ffi::ResultBuffer<ffi::F32> dx,
                                 ffi::ResultBuffer<ffi::F32> dscale,
                                 ffi::ResultBuffer<ffi::F32> dshift, float epsilon, bool relu) {
  RowsView v;
  if (auto e = CheckedRows("ffcl_batch_norm_backward", x.dimensions(),
                           {{"dy", dy.dimensions()}, {"dx", dx->dimensions()}},
                           {{"mean", mean.dimensions()},
                            {"variance", variance.dimensions()},
                            {"scale", scale.dimensions()},
                            {"shift", shift.dimensions()},
                            {"dscale", dscale->dimensions()},
                            {"dshift", dshift->dimensions()}},
                           &v);
      e.failure()) {
    return e;
  }
  const float floor = relu ? 0.0f : -INFINITY;  // the fused ReLU, or none
  const float *xs = x.typed_data(), *dys = dy.typed_data(), *m = mean.typed_data();
  const float *gamma = scale.typed_data(), *beta = shift.typed_data();
  std::vector<double> rstd = RstdOf(v, variance.typed_data(), epsilon);
  std::vector<float> a(v.channels);
  for (int64_t k = 0; k < v.channels; ++k) {
    a[k] = NormalizingScale(gamma[k], rstd[k]);  // as the forward pass rounded it
  }
  std::lock_guard<std::mutex> serial(ExecutionLock());
  std::vector<double> sum_g, sum_gx;
  ChannelSums(
      v,
      [&](const Block& b, double* s, double* q) {
        ReluOfNormalized gate{m + b.c0, a.data() + b.c0, beta + b.c0, floor};
        GradientSumRows(b, xs, dys, m + b.c0, gate, s, q);
      },
      &sum_g, &sum_gx);
  GradientFactors f = FactorsFromSums(v, rstd, gamma, sum_g, sum_gx, dscale->typed_data(),
                                      dshift->typed_data());
  float* dxs = dx->typed_data();
  OverBlocks(v, Shares(v), [&](const Block& b, int64_t) {
    ReluOfNormalized gate{m + b.c0, a.data() + b.c0, beta + b.c0, floor};
    InputGradientRows(b, xs, dys, dxs, m + b.c0, gate, f.da.data() + b.c0, f.db.data() + b.c0,
                      f.dc.data() + b.c0);
  });
  return ffi::Error::Success();
}

ffi::Error BatchNormAddReluBackwardImpl(
    ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> dy,
    ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> variance, ffi::Buffer<ffi::F32> scale,
    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
    ffi::ResultBuffer<ffi::F32> dshift, ffi::ResultBuffer<ffi::F32> dresidual, float epsilon) {
  RowsView v;
  if (auto e = CheckedRows("ffcl_batch_norm_add_relu_backward", x.dimensions(),
                           {{"y", y.dimensions()},
                            {"dy", dy.dimensions()},
                            {"dx", dx->dimensions()},
                            {"dresidual", dresidual->dimensions()}},
                           {{"mean", mean.dimensions()},
                            {"variance", variance.dimensions()},
                            {"scale", scale.dimensions()},
                            {"dscale", dscale->dimensions()},
                            {"dshift", dshift->dimensions()}},
                           &v);
      e.failure()) {
    return e;
  }
  const float *xs = x.typed_data(), *ys = y.typed_data(), *dys = dy.typed_data();
  const float* m = mean.typed_data();
  std::vector<double> rstd = RstdOf(v, variance.typed_data(), epsilon);
  std::lock_guard<std::mutex> serial(ExecutionLock());
  std::vector<double> sum_g, sum_gx;
  ChannelSums(
      v,
      [&](const Block& b, double* s, double* q) {
        GradientSumRows(b, xs, dys, m + b.c0, ReluOfOutput{ys, nullptr}, s, q);
      },
      &sum_g, &sum_gx);
  GradientFactors f = FactorsFromSums(v, rstd, scale.typed_data(), sum_g, sum_gx,
                                      dscale->typed_data(), dshift->typed_data());
  float *dxs = dx->typed_data(), *drs = dresidual->typed_data();
  OverBlocks(v, Shares(v), [&](const Block& b, int64_t) {
    InputGradientRows(b, xs, dys, dxs, m + b.c0, ReluOfOutput{ys, drs}, f.da.data() + b.c0,
                      f.db.data() + b.c0, f.dc.data() + b.c0);
  });
  return ffi::Error::Success();
}

// Every handler's work runs on this one thread of the library's own, while the XLA thread that
// called it sleeps. libgomp keeps a separate pool of worker threads for each thread that opens a
// parallel region: with regions opened from whichever of XLA's threads runs a handler, each of
// them had its own team, whose workers kept spinning after their region while another team ran,
// more busy threads than cores. One opening thread means one team, and the caller's core is free
// for it. A process forked from one that ran the kernels starts a thread of its own.
class KernelThread {
 public:
  static void Run(const std::function<void()>& work) {
    static std::mutex creation;
    static KernelThread* instance = nullptr;
    static pid_t owner = 0;
    KernelThread* thread;
    {
      std::lock_guard<std::mutex> lock(creation);
      if (instance == nullptr || owner != getpid()) {
        instance = new KernelThread();  // never deleted: it serves until the process ends
        owner = getpid();
      }
      thread = instance;
    }
    thread->Execute(work);
  }

 private:
  KernelThread() { std::thread([this] { Serve(); }).detach(); }

  void Execute(const std::function<void()>& work) {
    std::lock_guard<std::mutex> one_caller(submit_);
    std::unique_lock<std::mutex> lock(mutex_);
    work_ = &work;
    done_ = false;
    wake_.notify_all();
    wake_.wait(lock, [this] { return done_; });
  }

  void Serve() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return work_ != nullptr; });
      const std::function<void()>* work = work_;
      lock.unlock();
      (*work)();
      lock.lock();
      work_ = nullptr;
      done_ = true;
      wake_.notify_all();
    }
  }

  std::mutex submit_;
  std::mutex mutex_;
  std::condition_variable wake_;
  const std::function<void()>* work_ = nullptr;
  bool done_ = false;
};

// Whether handlers run on the KernelThread (else on the XLA thread that calls them); a switch
// for benchmarks and tests that compare the two in one process (FfclSetKernelThread).
std::atomic<bool> on_kernel_thread{true};

// How many threads have run a handler's work (for a test that shows it is one).
std::atomic<int64_t> work_threads{0};

// oneDNN reports failures as exceptions; XLA's FFI wants an error value.
template <typename Fn>
ffi::Error Guarded(Fn fn) {
  ffi::Error result = ffi::Error::Success();
  auto guarded = [&] {
    thread_local bool counted = false;
    if (!counted) {
      counted = true;
      work_threads.fetch_add(1);
    }
    try {
      result = fn();
    } catch (const dnnl::error& e) {
      result = ffi::Error::Internal(std::string("oneDNN: ") + e.what());
    } catch (const std::exception& e) {
      result = ffi::Error::Internal(e.what());
    }
  };
  if (on_kernel_thread.load(std::memory_order_relaxed)) {
    KernelThread::Run(guarded);
  } else {
    guarded();
  }
  return result;
}

}  // namespace

// For tests, through ctypes: the plans a convolution pass holds (0 forward, 1 backward data,
// 2 backward weights), and the most each pass keeps (set, returning the previous limit).
extern "C" int64_t FfclCachedPlans(int64_t pass) {
  switch (pass) {
    case 0:
      return static_cast<int64_t>(ForwardPlans().Size());
    case 1:
      return static_cast<int64_t>(BackwardDataPlans().Size());
    case 2:
      return static_cast<int64_t>(BackwardWeightsPlans().Size());
    default:
      return -1;
  }
}

// For benchmarks and tests, through ctypes: run the handlers on the KernelThread (1) or on the
// calling XLA thread (0), returning the previous setting.
extern "C" int64_t FfclSetKernelThread(int64_t on) {
  return on_kernel_thread.exchange(on != 0) ? 1 : 0;
}

extern "C" int64_t FfclWorkThreads() { return work_threads.load(); }

extern "C" int64_t FfclSetMaxPlans(int64_t limit) {
  const size_t kept = static_cast<size_t>(std::max<int64_t>(1, limit));
  return static_cast<int64_t>(max_plans.exchange(kept));
}

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

FFCL_HANDLER(FfclConvForward, ConvForwardImpl<false>, FFCL_CONV_BINDING);
FFCL_HANDLER(FfclConvInference, ConvForwardImpl<true>, FFCL_CONV_BINDING);
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
        .Attr<float>("epsilon")
        .Attr<bool>("relu"));

FFCL_HANDLER(
    FfclBatchNormBackward, BatchNormBackwardImpl,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<float>("epsilon")
        .Attr<bool>("relu"));

FFCL_HANDLER(
    FfclBatchNormAddReluForward, BatchNormAddReluForwardImpl,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<float>("epsilon"));

FFCL_HANDLER(
    FfclBatchNormAddReluBackward, BatchNormAddReluBackwardImpl,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<float>("epsilon"));
