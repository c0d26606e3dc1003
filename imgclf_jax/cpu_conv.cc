// f32 NHWC x HWIO 2-D convolutions for XLA:CPU on x86-64 with AVX2 + FMA or AVX-512, called through the XLA FFI.
//
// Why: XLA:CPU's own convolutions reach 15-60% of this machine's matmul peak on small CNNs (a 3-channel first
// layer runs at 15 GFLOP/s, and weight gradients pay for layout transposes); docs/performance.md has the
// figures. 3x3 stride-1 convolutions with 8 or more input channels go by Winograd's algorithm (below); the
// others are register-blocked "direct" convolutions: no im2col matrix is built,
// because at one output pixel and one kernel row the kw*C input values a convolution reads are contiguous
// in an NHWC image, whatever the stride. Each image is first copied into a zero-bordered buffer (so no
// bounds checks in the inner loops), which stays in the core's cache while it is used.
//
//   forward:          y[n,oy,ox,o] = sum_{i,l} xpad[n, oy*sh+i, ox*sw .. , l] * w[i, l, o]
//   weight gradient:  dw[i, l, o]  = sum_{n,oy,ox} xpad[n, oy*sh+i, ox*sw .., l] * dy[n, oy, ox, o]
//
// (l runs over the kw*C contiguous values of kernel row i.) The input gradient of a stride-1 convolution is
// the forward kernel applied to dy with the flipped, transposed kernel (done in imgclf_jax/cpu_conv.py).
// Work is handed out in chunks of images (or output rows) to up to one thread per core (IMGCLF_CONV_THREADS
// sets another count): the calling thread and tasks on XLA's own intra-op thread pool, which XLA hands to each
// call (IMGCLF_CONV_OWN_THREADS=1: threads of the kernels' own instead, for comparisons); the weight gradient
// adds one partial sum per chunk in a fixed order, so a result never depends on thread timing. Results equal
// XLA's up to float rounding (tests/test_conv.py).

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Floats per vector in the matrix tiles: 8 (AVX2) or 16 (AVX-512). cpu_conv.py builds one library per
// variant it may use (its VARIANTS), with -DIMGCLF_LANES and the matching -m flags.
#ifndef IMGCLF_LANES
#define IMGCLF_LANES 8
#endif
constexpr int kLanes = IMGCLF_LANES;
static_assert(kLanes == 8 || kLanes == 16, "IMGCLF_LANES must be 8 or 16");

constexpr int kMaxRows = 6;  // Register block: 6 rows x 2 vectors = 12 accumulators.
constexpr int64_t kTilePixels = 192;  // Pixels per weight-gradient tile (their rows of dy stay in L1/L2).

struct Geometry {
  int64_t n, h, w, c;       // input
  int64_t kh, kw, o;        // kernel (kh, kw, c, o)
  int64_t sh, sw, pt, pl;   // strides and leading padding
  int64_t ho, wo;           // output
  int64_t hp, wp;           // padded extent the windows read: (ho - 1) * s + k
  int64_t len() const { return kw * c; }        // contiguous values per kernel row and output pixel
  int64_t op() const { return (o + 7) / 8 * 8; }  // output channels rounded up to whole 8-float vectors
};

int NumThreads() {
  if (const char* forced = std::getenv("IMGCLF_CONV_THREADS")) return std::max(1, std::atoi(forced));
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Runs body(thread, next) on up to `threads` threads (the caller's among them). next(&begin, &end) hands out
// the next chunk of [0, count) until none is left: a thread slowed down by other work (XLA runs independent
// operations beside ours) takes fewer chunks instead of holding the others up at the end. The helpers are
// tasks on XLA's thread pool where the call has one, so that they do not compete with XLA's threads for the
// cores (threads of our own beside XLA's made the tutorial CNN's step 14% slower, docs/performance.md): a
// task that starts only once the caller has taken every chunk returns at once.
template <typename F>
void ParallelChunks(ffi::ThreadPool& pool, int64_t count, int64_t chunk, int threads, F&& body) {
  std::atomic<int64_t> next_item{0};
  auto next = [&](int64_t* begin, int64_t* end) {
    *begin = next_item.fetch_add(chunk);
    if (*begin >= count) return false;
    *end = std::min(count, *begin + chunk);
    return true;
  };
  threads = static_cast<int>(std::min<int64_t>(threads, (count + chunk - 1) / chunk));
  if (pool.num_threads() > 0 && std::getenv("IMGCLF_CONV_OWN_THREADS") == nullptr) {
    struct Control {
      std::mutex mu;
      std::condition_variable idle;
      int running = 0;
      bool closed = false;  // Set once the caller has finished: later tasks must not touch body or next.
    };
    const auto control = std::make_shared<Control>();
    for (int t = 1; t < threads; ++t) {
      pool.Schedule([control, &body, &next, t] {
        {
          std::lock_guard<std::mutex> lock(control->mu);
          if (control->closed) return;
          ++control->running;
        }
        body(t, next);
        std::lock_guard<std::mutex> lock(control->mu);
        if (--control->running == 0) control->idle.notify_all();
      });
    }
    body(0, next);
    std::unique_lock<std::mutex> lock(control->mu);
    control->closed = true;
    control->idle.wait(lock, [&] { return control->running == 0; });
    return;
  }
  std::vector<std::thread> workers;
  for (int t = 1; t < threads; ++t) workers.emplace_back([&, t] { body(t, next); });
  body(0, next);
  for (auto& worker : workers) worker.join();
}

// Chunks of the forward pass's items (output rows, or pairs of them when pooling): whole images when there
// are plenty, else about four chunks per thread.
int64_t RowChunk(int64_t n, int64_t per_image, int threads) {
  if (n >= 4 * threads) return per_image;
  return std::max<int64_t>(1, n * per_image / (4 * threads));
}

// The fixed split of n images x per_image items into the weight gradients' chunks, one partial sum of
// partial_floats each: up to 32 chunks (fine enough for the threads to share the work evenly), fewer where
// the partial sums would pass 16 MB, but at least 4 per thread; whole images where there are enough of them.
int64_t WeightGradChunk(int64_t n, int64_t per_image, int64_t partial_floats, int threads) {
  const int64_t items = n * per_image;
  const int64_t chunks = std::max<int64_t>(4 * threads, std::min<int64_t>(32, (16 << 20) / (4 * partial_floats)));
  return n >= chunks ? per_image * ((n + chunks - 1) / chunks) : (items + chunks - 1) / chunks;
}

// Where the kernels read an NHWC image from: a plain (n, h, w, c) array, or the gradient of a convolution that
// is followed by bias, ReLU and 2x2 max-pooling, held as the pooled gradient (n, h/2, w/2, c) and the pool's
// choices (which of the window's four positions gave the maximum; 4 where it was not positive) and expanded
// on the fly: the full-size gradient is never written to memory.
struct ImageSource {
  const float* data;
  const uint8_t* choice;  // null for a plain array
  int64_t h, w, c;        // the full-size image

  // Columns [x0, x1) of row y of image `image` into dst, one pixel every pixel_stride floats.
  void Row(int64_t image, int64_t y, int64_t x0, int64_t x1, float* dst, int64_t pixel_stride) const {
    if (choice == nullptr) {
      const float* src = data + ((image * h + y) * w + x0) * c;
      if (pixel_stride == c) {
        std::memcpy(dst, src, sizeof(float) * (x1 - x0) * c);
      } else {
        for (int64_t x = x0; x < x1; ++x) std::memcpy(dst + (x - x0) * pixel_stride, src + (x - x0) * c, sizeof(float) * c);
      }
      return;
    }
    const int64_t ph = h / 2, pw = w / 2;
    for (int64_t x = x0; x < x1; ++x) {
      float* out = dst + (x - x0) * pixel_stride;
      if (y >= 2 * ph || x >= 2 * pw) {  // Rows and columns the pooling dropped.
        std::memset(out, 0, sizeof(float) * c);
        continue;
      }
      const int position = static_cast<int>((y % 2) * 2 + x % 2);
      const int64_t at = ((image * ph + y / 2) * pw + x / 2) * c;
      const __m256i wanted = _mm256_set1_epi32(position);
      int64_t k = 0;
#ifdef __AVX512F__
      for (; k + 16 <= c; k += 16) {  // 16 channels at once: a mask from the choices, a masked load.
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(choice + at + k)));
        const __mmask16 chosen = _mm512_cmpeq_epi32_mask(bytes, _mm512_set1_epi32(position));
        _mm512_storeu_ps(out + k, _mm512_maskz_loadu_ps(chosen, data + at + k));
      }
#endif
      for (; k + 8 <= c; k += 8) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(choice + at + k));
        const __m256i chosen = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(bytes), wanted);
        _mm256_storeu_ps(out + k, _mm256_and_ps(_mm256_castsi256_ps(chosen), _mm256_loadu_ps(data + at + k)));
      }
      for (; k < c; ++k) out[k] = choice[at + k] == position ? data[at + k] : 0.0f;
    }
  }
};

ImageSource Plain(const float* data, int64_t h, int64_t w, int64_t c) { return {data, nullptr, h, w, c}; }

// Image `image` of the source into buf (hp, wp, c), with zeros wherever a window reads padding.
void PadImage(const ImageSource& x, const Geometry& g, int64_t image, float* buf) {
  const int64_t lo = std::clamp<int64_t>(g.pl, 0, g.wp), hi = std::clamp<int64_t>(g.pl + g.w, 0, g.wp);
  for (int64_t yy = 0; yy < g.hp; ++yy) {
    float* dst = buf + yy * g.wp * g.c;
    const int64_t y = yy - g.pt;
    if (y < 0 || y >= g.h || hi <= lo) {
      std::memset(dst, 0, sizeof(float) * g.wp * g.c);
      continue;
    }
    std::memset(dst, 0, sizeof(float) * lo * g.c);
    x.Row(image, y, lo - g.pl, hi - g.pl, dst + lo * g.c, g.c);
    std::memset(dst + hi * g.c, 0, sizeof(float) * (g.wp - hi) * g.c);
  }
}

// Where a forward pass writes: y (n, ho, wo, o); or, for a convolution followed by bias, ReLU and 2x2
// max-pooling, the pooled y (n, ho/2, wo/2, o) and the pool's choices (see ImageSource).
struct Output {
  float* y;
  const float* bias;  // pooled output only
  uint8_t* choice;    // null: plain output

  bool pooled() const { return choice != nullptr; }
};

// GCC/Clang vector extensions (+ - * ?: work on them): 8 floats, and kLanes floats for the matrix tiles.
using Vec8 = float __attribute__((vector_size(32)));
using Vec16 = float __attribute__((vector_size(64)));

// Unaligned loads and stores of a float or float vector, through vector types of float alignment (as the
// compilers' own __m256_u and __m512_u are declared) rather than memcpy: memcpy's accesses may alias anything,
// so after each store the compiler would reload sizes, strides and pointers; these may alias floats only.
using Vec8Unaligned = float __attribute__((vector_size(32), aligned(4)));
using Vec16Unaligned = float __attribute__((vector_size(64), aligned(4)));
template <typename T>
struct Unaligned {
  using type = float;
};
template <>
struct Unaligned<Vec8> {
  using type = Vec8Unaligned;
};
template <>
struct Unaligned<Vec16> {
  using type = Vec16Unaligned;
};
template <typename T>
inline T Load(const float* p) {
  static_assert(sizeof(typename Unaligned<T>::type) == sizeof(T), "Load: a float or float vector");
  return *reinterpret_cast<const typename Unaligned<T>::type*>(p);
}
template <typename T>
inline void Store(float* p, T v) {
  static_assert(sizeof(typename Unaligned<T>::type) == sizeof(T), "Store: a float or float vector");
  *reinterpret_cast<typename Unaligned<T>::type*>(p) = v;
}

using VecL = std::conditional_t<kLanes == 16, Vec16, Vec8>;

// Calls body(k, T{}) for channels k = 0, kLanes, ... with T = VecL, then for one remainder of 8 with T =
// Vec8, then one at a time with T = float.
template <typename F>
inline void ForChannels(int64_t count, F&& body) {
  int64_t k = 0;
  for (; k + kLanes <= count; k += kLanes) body(k, VecL{});
  for (; k + 8 <= count; k += 8) body(k, Vec8{});
  for (; k < count; ++k) body(k, 0.0f);
}

// Pooling choices (whole numbers 0..4 held as floats) as bytes, a vector at once, packed in registers: lane by
// lane, the conversion costs as much as the 3-channel first layer's convolution (docs/performance.md).
inline void StoreChoice(Vec8 positions, uint8_t* choice) {
  const __m256i ints = _mm256_cvttps_epi32(positions);
  const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(ints), _mm256_extracti128_si256(ints, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(choice), _mm_packus_epi16(words, words));
}
inline void StoreChoice(float position, uint8_t* choice) { *choice = static_cast<uint8_t>(position); }
inline void StoreChoice(Vec16 positions, uint8_t* choice) {
#ifdef __AVX512F__
  _mm_storeu_si128(reinterpret_cast<__m128i*>(choice), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(positions)));
#else
  Vec8 half[2];
  std::memcpy(half, &positions, sizeof(positions));
  StoreChoice(half[0], choice);
  StoreChoice(half[1], choice + 8);
#endif
}

// One 2x2 window (v0..v3 in row-major order) of a channel vector: y = relu(max(v + bias)) and the position of
// the first maximum, or 4 where the maximum is not positive (ReLU's gradient is 0 there). Bias is added
// before comparing, as the layers it replaces do, so rounding picks the same position.
template <typename T>
inline void PoolWindow(T v0, T v1, T v2, T v3, T bias, float* y, uint8_t* choice) {
  const T zero{};
  T best = v0 + bias, at = zero;
  const T values[3] = {v1 + bias, v2 + bias, v3 + bias};
  for (int i = 0; i < 3; ++i) {
    const auto larger = values[i] > best;  // Strict: the first of equal values stays.
    best = larger ? values[i] : best;
    at = larger ? zero + static_cast<float>(i + 1) : at;
  }
  const auto positive = best > zero;
  Store(y, positive ? best : zero);
  StoreChoice(positive ? at : zero + 4.0f, choice);
}

template <typename V>
constexpr int Lanes() {
  return static_cast<int>(sizeof(V) / sizeof(float));
}

// A vector of V with every lane s: the scalar is broadcast, and subtracting 0 (exact for every s, -0 included)
// is folded away, leaving one broadcast instruction.
template <typename V>
inline V Splat(float s) {
  return s - V{};
}

// NR output pixels (`pixel_step` floats apart in the padded image) x NV vectors V of output channels. The
// multiply-adds are written as a * b + c and compiled to FMA instructions (-ffp-contract=fast).
template <int NR, int NV, typename V>
void ForwardTile(const float* a, int64_t pixel_step, int64_t row_step, const float* w, int64_t op,
                 int64_t kh, int64_t len, float* out, int64_t out_channels, int64_t valid) {
  constexpr int kL = Lanes<V>();
  V acc[NR][NV];
  _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t i = 0; i < kh; ++i) {
    const float* ai = a + i * row_step;
    const float* wi = w + i * len * op;
    for (int64_t l = 0; l < len; ++l) {
      V b[NV];
      _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) b[v] = Load<V>(wi + l * op + kL * v);
      _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r) {
        const V ar = Splat<V>(ai[r * pixel_step + l]);
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) acc[r][v] = ar * b[v] + acc[r][v];
      }
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r) {
    float* dst = out + r * out_channels;
    if (valid == NV * kL) {
      _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) Store(dst + kL * v, acc[r][v]);
    } else {
      float tmp[NV * kL];
      _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) Store(tmp + kL * v, acc[r][v]);
      std::memcpy(dst, tmp, sizeof(float) * valid);
    }
  }
}

// NR consecutive kernel values (of one kernel row) x NV vectors V of output channels, summed over np pixels
// whose offsets into the padded image and into dy are given.
template <int NR, int NV, typename V>
void WeightGradTile(const float* a, const int64_t* a_offsets, const float* d, const int64_t* d_offsets,
                    int64_t pixels, float* g, int64_t op) {
  constexpr int kL = Lanes<V>();
  V acc[NR][NV];
  _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) acc[r][v] = Load<V>(g + r * op + kL * v);
  for (int64_t p = 0; p < pixels; ++p) {
    const float* ap = a + a_offsets[p];
    const float* dp = d + d_offsets[p];
    V b[NV];
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) b[v] = Load<V>(dp + kL * v);
    _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r) {
      const V ar = Splat<V>(ap[r]);
      _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) acc[r][v] = ar * b[v] + acc[r][v];
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) Store(g + r * op + kL * v, acc[r][v]);
}

using ForwardFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float*,
                           int64_t, int64_t);
using WeightGradFn = void (*)(const float*, const int64_t*, const float*, const int64_t*, int64_t, float*,
                              int64_t);

template <int NR, int NV, typename V>
struct ForwardKernel {
  static constexpr ForwardFn fn = ForwardTile<NR, NV, V>;
};
template <int NR, int NV, typename V>
struct WeightGradKernel {
  static constexpr WeightGradFn fn = WeightGradTile<NR, NV, V>;
};

// The output channels [ob, op) are covered in blocks of two kLanes-float vectors, then one, then (16 lanes
// only) one 8-float vector for a remainder of 8: op is a whole number of 8-float vectors.
int64_t BlockWidth(int64_t remaining) {
  if (remaining >= 2 * kLanes) return 2 * kLanes;
  return remaining >= kLanes ? kLanes : 8;
}

// The tile for `rows` rows and a block of `width` (BlockWidth's) output channels.
template <template <int, int, typename> class K, typename Fn>
Fn Pick(int rows, int64_t width) {
  static const Fn table[kMaxRows][3] = {{K<1, 1, Vec8>::fn, K<1, 1, VecL>::fn, K<1, 2, VecL>::fn},
                                        {K<2, 1, Vec8>::fn, K<2, 1, VecL>::fn, K<2, 2, VecL>::fn},
                                        {K<3, 1, Vec8>::fn, K<3, 1, VecL>::fn, K<3, 2, VecL>::fn},
                                        {K<4, 1, Vec8>::fn, K<4, 1, VecL>::fn, K<4, 2, VecL>::fn},
                                        {K<5, 1, Vec8>::fn, K<5, 1, VecL>::fn, K<5, 2, VecL>::fn},
                                        {K<6, 1, Vec8>::fn, K<6, 1, VecL>::fn, K<6, 2, VecL>::fn}};
  return table[rows - 1][width == 2 * kLanes ? 2 : width == kLanes ? 1 : 0];
}

// Kernel (kh, kw, c, o) -> (kh * len, op), output channels zero-padded to whole vectors.
std::vector<float> PackKernel(const float* w, const Geometry& g) {
  const int64_t rows = g.kh * g.len(), op = g.op();
  std::vector<float> packed(rows * op, 0.0f);
  for (int64_t k = 0; k < rows; ++k) std::memcpy(&packed[k * op], w + k * g.o, sizeof(float) * g.o);
  return packed;
}

// One output row (wo pixels x o channels) from the padded image's rows starting at `row`.
void ForwardRow(const float* row, const float* packed, const Geometry& g, float* out_row) {
  const int64_t op = g.op();
  // Output channels outer, pixels inner: one block's weights (kh * len * 16 floats) stay in L1/L2.
  for (int64_t ob = 0, width; ob < op; ob += width) {
    width = BlockWidth(op - ob);
    const int64_t valid = std::min<int64_t>(width, g.o - ob);
    for (int64_t ox = 0; ox < g.wo; ox += kMaxRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, g.wo - ox));
      Pick<ForwardKernel, ForwardFn>(rows, width)(row + ox * g.sw * g.c, g.sw * g.c, g.wp * g.c, packed + ob, op,
                                                   g.kh, g.len(), out_row + ox * g.o + ob, g.o, valid);
    }
  }
}

// Pooled row `py` of image `image` from the two output rows under it (each wo x o).
void PoolRows(const float* top, const float* bottom, const Geometry& g, const Output& out, int64_t image,
              int64_t py) {
  const int64_t pw = g.wo / 2, at = (image * (g.ho / 2) + py) * pw * g.o;
  for (int64_t px = 0; px < pw; ++px) {
    const float *t = top + 2 * px * g.o, *b = bottom + 2 * px * g.o;
    ForChannels(g.o, [&](int64_t k, auto zero) {
      using T = decltype(zero);
      PoolWindow(Load<T>(t + k), Load<T>(t + g.o + k), Load<T>(b + k), Load<T>(b + g.o + k),
                 Load<T>(out.bias + k), out.y + at + px * g.o + k, out.choice + at + px * g.o + k);
    });
  }
}

void Forward(ffi::ThreadPool& pool, const ImageSource& x, const float* w, const Output& out, const Geometry& g) {
  const std::vector<float> packed = PackKernel(w, g);
  const int threads = NumThreads();
  const int64_t per_image = out.pooled() ? g.ho / 2 : g.ho;  // Items: output rows, or pairs when pooling.
  ParallelChunks(pool, g.n * per_image, RowChunk(g.n, per_image, threads), threads, [&](int, auto& next) {
    std::vector<float> buf(g.hp * g.wp * g.c), rows(out.pooled() ? 2 * g.wo * g.o : 0);
    const int64_t row_floats = g.sh * g.wp * g.c;
    int64_t padded_image = -1, begin, end;
    while (next(&begin, &end)) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t image = item / per_image, r = item % per_image;
        if (image != padded_image) {
          PadImage(x, g, image, buf.data());
          padded_image = image;
        }
        if (!out.pooled()) {
          ForwardRow(buf.data() + r * row_floats, packed.data(), g, out.y + (image * g.ho + r) * g.wo * g.o);
          continue;
        }
        float* bottom = rows.data() + g.wo * g.o;
        ForwardRow(buf.data() + 2 * r * row_floats, packed.data(), g, rows.data());
        ForwardRow(buf.data() + (2 * r + 1) * row_floats, packed.data(), g, bottom);
        PoolRows(rows.data(), bottom, g, out, image, r);
      }
    }
  });
}

void WeightGrad(ffi::ThreadPool& pool, const ImageSource& x, const ImageSource& dy, float* dw, const Geometry& g) {
  const int64_t op = g.op(), len = g.len(), rows = g.kh * len;
  // One partial sum per chunk of output rows (a fixed split, whichever thread takes a chunk), added up in
  // chunk order: the result does not depend on how the threads happened to share the work.
  const int threads = NumThreads();
  const int64_t items = g.n * g.ho, chunk = WeightGradChunk(g.n, g.ho, rows * op, threads);
  std::vector<std::vector<float>> partial((items + chunk - 1) / chunk);
  ParallelChunks(pool, items, chunk, threads, [&](int, auto& next) {
    std::vector<float> buf(g.hp * g.wp * g.c);
    // A tile's pixels of dy as whole vectors (zero-padded channels), expanded from a pooled gradient if need
    // be: made per tile, so that they stay in L1 (a whole image's at 180 px would fill a core's L2).
    const bool copy_dy = g.o != op || dy.choice != nullptr;
    std::vector<float> dy_tile(copy_dy ? kTilePixels * op : 0, 0.0f);
    std::vector<int64_t> a_offsets(kTilePixels), d_offsets(kTilePixels);
    int64_t item, end;
    while (next(&item, &end)) {
      std::vector<float>& total = partial[item / chunk];
      total.assign(rows * op, 0.0f);
      while (item < end) {  // The rows [item, end) may span images: one image at a time.
        const int64_t image = item / g.ho;
        const int64_t image_end = std::min(end, (image + 1) * g.ho);
        PadImage(x, g, image, buf.data());
        // Tiles of up to kTilePixels output pixels of this image, in rows [item, image_end).
        int64_t pixel = (item % g.ho) * g.wo;
        const int64_t pixel_end = (image_end - image * g.ho) * g.wo;
        while (pixel < pixel_end) {
          const int64_t tile = std::min(kTilePixels, pixel_end - pixel);
          const float* d = copy_dy ? dy_tile.data() : dy.data + (image * g.ho * g.wo + pixel) * g.o;
          const int64_t d_stride = copy_dy ? op : g.o;
          for (int64_t p = 0, oy = pixel / g.wo, ox = pixel % g.wo; p < tile; ++oy, ox = 0) {
            const int64_t run = std::min(tile - p, g.wo - ox);  // Pixels of output row oy in this tile.
            if (copy_dy) dy.Row(image, oy, ox, ox + run, &dy_tile[p * op], op);
            for (int64_t q = 0; q < run; ++q, ++p) {
              a_offsets[p] = (oy * g.sh * g.wp + (ox + q) * g.sw) * g.c;
              d_offsets[p] = p * d_stride;
            }
          }
          for (int64_t i = 0; i < g.kh; ++i) {
            for (int64_t l = 0; l < len; l += kMaxRows) {
              const int block = static_cast<int>(std::min<int64_t>(kMaxRows, len - l));
              for (int64_t ob = 0, width; ob < op; ob += width) {
                width = BlockWidth(op - ob);
                Pick<WeightGradKernel, WeightGradFn>(block, width)(
                    buf.data() + i * g.wp * g.c + l, a_offsets.data(), d + ob, d_offsets.data(), tile,
                    total.data() + (i * len + l) * op + ob, op);
              }
            }
          }
          pixel += tile;
        }
        item = image_end;
      }
    }
  });
  for (int64_t k = 0; k < rows; ++k) {
    for (int64_t o = 0; o < g.o; ++o) {
      float sum = 0.0f;
      for (const auto& part : partial) sum += part[k * op + o];
      dw[k * g.o + o] = sum;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Winograd F(MxM, 3x3), M = 2 or 4, for 3x3 stride-1 convolutions with at least kWinogradMinChannels input
// channels.
//
// Each MxM block of outputs ("tile") is computed from the (M+2)x(M+2) input window under it as
//   Y = A^T [ (G w G^T) (.) (B^T d B) ] A
// (Lavin & Gray, 2016): (M+2)^2 elementwise products per input/output channel pair instead of 9 M^2
// multiply-adds, 2.25x (M = 2) or 4x (M = 4) less arithmetic. The products summed over input channels are
// (M+2)^2 small matrix products (tiles x C) . (C x O), which run in ForwardTile; the transforms are a few
// additions and multiplications by small constants. The weight gradient is the adjoint:
// dW = G^T [ sum over tiles (B^T d B) (.) (A dY A^T) ] G, whose inner sums are WeightGradTile's. Results
// differ from a direct convolution by float rounding: about 1e-7 of the outputs' scale for M = 2 (whose
// coefficients are 0, +-1 and +-1/2), about 2e-6 for M = 4 (tests/test_conv.py compares with XLA's).

// The 1-D transforms of F(2x2, 3x3); each 2-D transform applies one to the columns, then to the rows.
struct WinogradF2 {
  static constexpr int kM = 2, kAlpha = 4;
  template <typename T>  // B^T x
  static void Input(const T* x, T* y) {
    y[0] = x[0] - x[2];
    y[1] = x[1] + x[2];
    y[2] = x[2] - x[1];
    y[3] = x[1] - x[3];
  }
  template <typename T>  // A^T m
  static void Output(const T* m, T* y) {
    y[0] = m[0] + m[1] + m[2];
    y[1] = m[1] - m[2] - m[3];
  }
  template <typename T>  // A d (the output gradient's transform)
  static void OutputGrad(const T* d, T* e) {
    e[0] = d[0];
    e[1] = d[0] + d[1];
    e[2] = d[0] - d[1];
    e[3] = -d[1];
  }
  static void Kernel(const float* g, float* u) {  // G g
    u[0] = g[0];
    u[1] = 0.5f * (g[0] + g[1] + g[2]);
    u[2] = 0.5f * (g[0] - g[1] + g[2]);
    u[3] = g[2];
  }
  static void KernelGrad(const float* m, float* w) {  // G^T m
    w[0] = m[0] + 0.5f * (m[1] + m[2]);
    w[1] = 0.5f * (m[1] - m[2]);
    w[2] = 0.5f * (m[1] + m[2]) + m[3];
  }
};

// F(4x4, 3x3) with the interpolation points 0, +-1, +-2 (Lavin & Gray's matrices).
struct WinogradF4 {
  static constexpr int kM = 4, kAlpha = 6;
  template <typename T>
  static void Input(const T* x, T* y) {
    const T a = x[4] - 4.0f * x[2], b = x[3] - 4.0f * x[1], c = x[4] - x[2], d = 2.0f * (x[3] - x[1]);
    y[0] = 4.0f * x[0] - 5.0f * x[2] + x[4];
    y[1] = a + b;
    y[2] = a - b;
    y[3] = c + d;
    y[4] = c - d;
    y[5] = 4.0f * x[1] - 5.0f * x[3] + x[5];
  }
  template <typename T>
  static void Output(const T* m, T* y) {
    const T s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
    y[0] = m[0] + s12 + s34;
    y[1] = d12 + 2.0f * d34;
    y[2] = s12 + 4.0f * s34;
    y[3] = d12 + 8.0f * d34 + m[5];
  }
  template <typename T>
  static void OutputGrad(const T* d, T* e) {
    const T s02 = d[0] + d[2], s13 = d[1] + d[3], t02 = d[0] + 4.0f * d[2], t13 = 2.0f * d[1] + 8.0f * d[3];
    e[0] = d[0];
    e[1] = s02 + s13;
    e[2] = s02 - s13;
    e[3] = t02 + t13;
    e[4] = t02 - t13;
    e[5] = d[3];
  }
  static void Kernel(const float* g, float* u) {
    u[0] = g[0] / 4.0f;
    u[1] = -(g[0] + g[1] + g[2]) / 6.0f;
    u[2] = -(g[0] - g[1] + g[2]) / 6.0f;
    u[3] = g[0] / 24.0f + g[1] / 12.0f + g[2] / 6.0f;
    u[4] = g[0] / 24.0f - g[1] / 12.0f + g[2] / 6.0f;
    u[5] = g[2];
  }
  static void KernelGrad(const float* m, float* w) {
    w[0] = m[0] / 4.0f - (m[1] + m[2]) / 6.0f + (m[3] + m[4]) / 24.0f;
    w[1] = (m[2] - m[1]) / 6.0f + (m[3] - m[4]) / 12.0f;
    w[2] = (m[3] + m[4] - m[1] - m[2]) / 6.0f + m[5];
  }
};

// Bytes of one block's transformed inputs and products ((M+2)^2 positions x tiles x (c + op) floats): about
// what stays in a core's L2 beside the rest (the tutorial CNN's kernels took 86, 90, 76 and 76 ms with 128 KB,
// 256 KB, 512 KB and 1 MB; docs/performance.md).
constexpr int64_t kWinogradBlockBytes = 512 << 10;
constexpr int64_t kWinogradMinChannels = 8;   // Fewer input channels: the direct kernels do better.
                                              // (cpu_conv.py's WINOGRAD_MIN_CHANNELS is the same.)
// F(4x4) where the output is at least this many pixels wide and high: smaller outputs waste too much of
// their edge tiles.
constexpr int64_t kWinogradF4MinSide = 12;

bool UseWinograd(const Geometry& g) {
  return g.kh == 3 && g.kw == 3 && g.sh == 1 && g.sw == 1 && g.c >= kWinogradMinChannels;
}

bool UseWinogradF4(const Geometry& g) { return g.ho >= kWinogradF4MinSide && g.wo >= kWinogradF4MinSide; }

template <typename W>
struct WinogradShape {
  // Tiles down and across one image, per image, per block (whole register blocks of kMaxRows, 12 to 192, within
  // kWinogradBlockBytes), blocks per image.
  int64_t th, tw, tiles, per_block, blocks;
  explicit WinogradShape(const Geometry& g)
      : th((g.ho + W::kM - 1) / W::kM), tw((g.wo + W::kM - 1) / W::kM), tiles(th * tw),
        per_block(std::clamp<int64_t>(kWinogradBlockBytes / (4 * W::kAlpha * W::kAlpha * (g.c + g.op())) /
                                          kMaxRows * kMaxRows, 2 * kMaxRows, 192)),
        blocks((tiles + per_block - 1) / per_block) {}
};

// The geometry whose padded buffer covers whole windows of every tile.
template <typename W>
Geometry WinogradPadded(Geometry g) {
  const WinogradShape<W> s(g);
  g.hp = W::kM * s.th + 2;
  g.wp = W::kM * s.tw + 2;
  return g;
}

// v[xi][t][k] = (B^T d B)[xi] for the window of tile `first + t` of the padded image, t < count.
template <typename W>
void InputTransform(const float* buf, const Geometry& g, const WinogradShape<W>& s, int64_t first, int64_t count,
                    float* v) {
  constexpr int kA = W::kAlpha;
  const int64_t c = g.c, row = g.wp * c, plane = count * c;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t ty = (first + t) / s.tw, tx = (first + t) % s.tw;
    const float* d = buf + W::kM * (ty * row + tx * c);
    float* out = v + t * c;
    ForChannels(c, [&](int64_t k, auto zero) {
      using T = decltype(zero);
      T x[kA][kA], bt[kA][kA], col[kA], res[kA];
      for (int r = 0; r < kA; ++r)
        for (int q = 0; q < kA; ++q) x[r][q] = Load<T>(d + r * row + q * c + k);
      for (int q = 0; q < kA; ++q) {  // B^T x: each column.
        for (int r = 0; r < kA; ++r) col[r] = x[r][q];
        W::Input(col, res);
        for (int r = 0; r < kA; ++r) bt[r][q] = res[r];
      }
      for (int r = 0; r < kA; ++r) {  // (B^T x) B: each row.
        W::Input(bt[r], res);
        for (int q = 0; q < kA; ++q) Store(out + (kA * r + q) * plane + k, res[q]);
      }
    });
  }
}

// u[xi][k][o] = (G w G^T)[xi] for the kernel's (k, o) 3x3 slice; output channels padded to op with zeros.
template <typename W>
std::vector<float> KernelTransform(const float* w, const Geometry& g) {
  constexpr int kA = W::kAlpha;
  const int64_t op = g.op(), ko = g.c * op;
  std::vector<float> u(kA * kA * ko, 0.0f);
  for (int64_t k = 0; k < g.c; ++k) {
    for (int64_t o = 0; o < g.o; ++o) {
      float x[3], gx[kA][3], res[kA];
      for (int j = 0; j < 3; ++j) {  // G x: each column.
        for (int i = 0; i < 3; ++i) x[i] = w[((i * 3 + j) * g.c + k) * g.o + o];
        W::Kernel(x, res);
        for (int r = 0; r < kA; ++r) gx[r][j] = res[r];
      }
      for (int r = 0; r < kA; ++r) {  // (G x) G^T: each row.
        W::Kernel(gx[r], res);
        for (int q = 0; q < kA; ++q) u[(kA * r + q) * ko + k * op + o] = res[q];
      }
    }
  }
  return u;
}

// Tiles `first + t` (t < count) of image `image` from m[xi][t][o]: Y = A^T m A, cut at the image's edge; or,
// for a pooled output, each tile's MxM outputs as (M/2)^2 pooling windows.
template <typename W>
void OutputTransform(const float* m, const Geometry& g, const WinogradShape<W>& s, int64_t first, int64_t count,
                     const Output& out, int64_t image) {
  constexpr int kA = W::kAlpha, kM = W::kM;
  const int64_t op = g.op(), plane = count * op, ph = g.ho / 2, pw = g.wo / 2;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t ty = (first + t) / s.tw, tx = (first + t) % s.tw;
    const int64_t y0 = kM * ty, x0 = kM * tx;
    if (out.pooled() && (y0 / 2 >= ph || x0 / 2 >= pw)) continue;  // Outputs the pooling drops.
    const int rows = static_cast<int>(std::min<int64_t>(kM, g.ho - y0));
    const int cols = static_cast<int>(std::min<int64_t>(kM, g.wo - x0));
    const float* src = m + t * op;
    ForChannels(g.o, [&](int64_t o, auto zero) {
      using T = decltype(zero);
      T x[kA][kA], a[kM][kA], col[kA], res[kM], y[kM][kM];
      for (int r = 0; r < kA; ++r)
        for (int q = 0; q < kA; ++q) x[r][q] = Load<T>(src + (kA * r + q) * plane + o);
      for (int q = 0; q < kA; ++q) {  // A^T x: each column.
        for (int r = 0; r < kA; ++r) col[r] = x[r][q];
        W::Output(col, res);
        for (int r = 0; r < kM; ++r) a[r][q] = res[r];
      }
      for (int r = 0; r < kM; ++r) W::Output(a[r], y[r]);  // (A^T x) A: each row.
      if (out.pooled()) {
        const T bias = Load<T>(out.bias + o);
        for (int wy = 0; wy < kM / 2; ++wy) {
          for (int wx = 0; wx < kM / 2; ++wx) {
            const int64_t py = y0 / 2 + wy, px = x0 / 2 + wx;
            if (py >= ph || px >= pw) continue;
            const int64_t at = ((image * ph + py) * pw + px) * g.o + o;
            PoolWindow(y[2 * wy][2 * wx], y[2 * wy][2 * wx + 1], y[2 * wy + 1][2 * wx], y[2 * wy + 1][2 * wx + 1],
                       bias, out.y + at, out.choice + at);
          }
        }
        return;
      }
      const int64_t at = ((image * g.ho + y0) * g.wo + x0) * g.o + o;
      for (int r = 0; r < rows; ++r)
        for (int q = 0; q < cols; ++q) Store(out.y + at + (r * g.wo + q) * g.o, y[r][q]);
    });
  }
}

// e[xi][t][o] = (A dY A^T)[xi] for tile `first + t`'s MxM output gradients (zero beyond the image's edge);
// output channels padded to op with zeros.
template <typename W>
void OutputGradTransform(const float* dy_image, const Geometry& g, const WinogradShape<W>& s, int64_t first,
                         int64_t count, float* e) {
  constexpr int kA = W::kAlpha, kM = W::kM;
  const int64_t op = g.op(), plane = count * op;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t ty = (first + t) / s.tw, tx = (first + t) % s.tw;
    const int rows = static_cast<int>(std::min<int64_t>(kM, g.ho - kM * ty));
    const int cols = static_cast<int>(std::min<int64_t>(kM, g.wo - kM * tx));
    const float* src = dy_image + (kM * ty * g.wo + kM * tx) * g.o;
    float* out = e + t * op;
    ForChannels(g.o, [&](int64_t o, auto zero) {
      using T = decltype(zero);
      T d[kM][kM], ad[kA][kM], col[kM], res[kA];
      for (int r = 0; r < kM; ++r)
        for (int q = 0; q < kM; ++q) d[r][q] = r < rows && q < cols ? Load<T>(src + (r * g.wo + q) * g.o + o) : zero;
      for (int q = 0; q < kM; ++q) {  // A d: each column.
        for (int r = 0; r < kM; ++r) col[r] = d[r][q];
        W::OutputGrad(col, res);
        for (int r = 0; r < kA; ++r) ad[r][q] = res[r];
      }
      for (int r = 0; r < kA; ++r) {  // (A d) A^T: each row.
        W::OutputGrad(ad[r], res);
        for (int q = 0; q < kA; ++q) Store(out + (kA * r + q) * plane + o, res[q]);
      }
    });
    if (g.o != op)
      for (int xi = 0; xi < kA * kA; ++xi) std::memset(out + xi * plane + g.o, 0, sizeof(float) * (op - g.o));
  }
}

template <typename W>
void WinogradForward(ffi::ThreadPool& pool, const ImageSource& x, const float* w, const Output& out,
                     const Geometry& geometry) {
  constexpr int64_t kP = W::kAlpha * W::kAlpha;
  const Geometry g = WinogradPadded<W>(geometry);
  const WinogradShape<W> s(g);
  const int64_t per_block = s.per_block;
  const std::vector<float> u = KernelTransform<W>(w, g);
  const int64_t op = g.op(), c = g.c;
  const int threads = NumThreads();
  const int64_t chunk = g.n >= 4 * threads ? s.blocks : 1;
  ParallelChunks(pool, g.n * s.blocks, chunk, threads, [&](int, auto& next) {
    std::vector<float> buf(g.hp * g.wp * c), v(kP * per_block * c), m(kP * per_block * op);
    int64_t padded_image = -1, begin, end;
    while (next(&begin, &end)) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t image = item / s.blocks, first = (item % s.blocks) * per_block;
        const int64_t count = std::min(per_block, s.tiles - first);
        if (image != padded_image) {
          PadImage(x, g, image, buf.data());
          padded_image = image;
        }
        InputTransform<W>(buf.data(), g, s, first, count, v.data());
        for (int64_t xi = 0; xi < kP; ++xi) {
          const float* vx = v.data() + xi * count * c;
          float* mx = m.data() + xi * count * op;
          for (int64_t ob = 0, width; ob < op; ob += width) {
            width = BlockWidth(op - ob);
            for (int64_t t = 0; t < count; t += kMaxRows) {
              const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, count - t));
              Pick<ForwardKernel, ForwardFn>(rows, width)(vx + t * c, c, 0, u.data() + xi * c * op + ob, op, 1, c,
                                                         mx + t * op + ob, op, width);
            }
          }
        }
        OutputTransform<W>(m.data(), g, s, first, count, out, image);
      }
    }
  });
}

template <typename W>
void WinogradWeightGrad(ffi::ThreadPool& pool, const ImageSource& x, const ImageSource& dy, float* dw,
                        const Geometry& geometry) {
  constexpr int kA = W::kAlpha;
  constexpr int64_t kP = kA * kA;
  const Geometry g = WinogradPadded<W>(geometry);
  const WinogradShape<W> s(g);
  const int64_t per_block = s.per_block;
  const int64_t op = g.op(), c = g.c, size = kP * c * op;
  const int threads = NumThreads();
  const int64_t items = g.n * s.blocks, chunk = WeightGradChunk(g.n, s.blocks, size, threads);
  std::vector<std::vector<float>> partial((items + chunk - 1) / chunk);
  ParallelChunks(pool, items, chunk, threads, [&](int, auto& next) {
    std::vector<float> buf(g.hp * g.wp * c), v(kP * per_block * c), e(kP * per_block * op);
    std::vector<int64_t> v_offsets(per_block), e_offsets(per_block);
    std::vector<float> dy_expanded(dy.choice != nullptr ? g.ho * g.wo * g.o : 0);
    int64_t padded_image = -1, begin, end;
    while (next(&begin, &end)) {
      std::vector<float>& total = partial[begin / chunk];
      total.assign(size, 0.0f);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t image = item / s.blocks, first = (item % s.blocks) * per_block;
        const int64_t count = std::min(per_block, s.tiles - first);
        const float* dy_image = dy.data + image * g.ho * g.wo * g.o;
        if (image != padded_image) {
          PadImage(x, g, image, buf.data());
          if (dy.choice != nullptr)
            for (int64_t oy = 0; oy < g.ho; ++oy) dy.Row(image, oy, 0, g.wo, &dy_expanded[oy * g.wo * g.o], g.o);
          padded_image = image;
        }
        if (dy.choice != nullptr) dy_image = dy_expanded.data();
        InputTransform<W>(buf.data(), g, s, first, count, v.data());
        OutputGradTransform<W>(dy_image, g, s, first, count, e.data());
        for (int64_t t = 0; t < count; ++t) {
          v_offsets[t] = t * c;
          e_offsets[t] = t * op;
        }
        for (int64_t xi = 0; xi < kP; ++xi) {
          for (int64_t k = 0; k < c; k += kMaxRows) {
            const int block = static_cast<int>(std::min<int64_t>(kMaxRows, c - k));
            for (int64_t ob = 0, width; ob < op; ob += width) {
              width = BlockWidth(op - ob);
              Pick<WeightGradKernel, WeightGradFn>(block, width)(
                  v.data() + xi * count * c + k, v_offsets.data(), e.data() + xi * count * op + ob,
                  e_offsets.data(), count, total.data() + (xi * c + k) * op + ob, op);
            }
          }
        }
      }
    }
  });
  // dW = G^T M G, M being the chunks' sums added in chunk order.
  std::vector<float>& sum = partial[0];
  for (size_t part = 1; part < partial.size(); ++part)
    for (int64_t i = 0; i < size; ++i) sum[i] += partial[part][i];
  for (int64_t k = 0; k < c; ++k) {
    for (int64_t o = 0; o < g.o; ++o) {
      float mq[kA], gm[3][kA], res[3];
      for (int q = 0; q < kA; ++q) {  // G^T M: each column.
        for (int r = 0; r < kA; ++r) mq[r] = sum[((kA * r + q) * c + k) * op + o];
        W::KernelGrad(mq, res);
        for (int i = 0; i < 3; ++i) gm[i][q] = res[i];
      }
      for (int i = 0; i < 3; ++i) {  // (G^T M) G: each row.
        W::KernelGrad(gm[i], res);
        for (int j = 0; j < 3; ++j) dw[((i * 3 + j) * c + k) * g.o + o] = res[j];
      }
    }
  }
}

ffi::Error MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y,
                        int64_t sh, int64_t sw, int64_t pt, int64_t pl, Geometry* g) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4)
    return ffi::Error::InvalidArgument("imgclf conv: expected NHWC input, HWIO kernel and NHWC output");
  *g = Geometry{x[0], x[1], x[2], x[3], w[0], w[1], w[3], sh, sw, pt, pl, y[1], y[2], 0, 0};
  g->hp = (g->ho - 1) * sh + g->kh;
  g->wp = (g->wo - 1) * sw + g->kw;
  if (w[2] != g->c || y[0] != g->n || y[3] != g->o || sh < 1 || sw < 1 || g->ho < 1 || g->wo < 1)
    return ffi::Error::InvalidArgument("imgclf conv: inconsistent shapes");
  return ffi::Error::Success();
}

void RunForward(ffi::ThreadPool& pool, const ImageSource& x, const float* w, const Output& out, const Geometry& g) {
  if (UseWinograd(g) && UseWinogradF4(g))
    WinogradForward<WinogradF4>(pool, x, w, out, g);
  else if (UseWinograd(g))
    WinogradForward<WinogradF2>(pool, x, w, out, g);
  else
    Forward(pool, x, w, out, g);
}

void RunWeightGrad(ffi::ThreadPool& pool, const ImageSource& x, const ImageSource& dy, float* dw, const Geometry& g) {
  if (UseWinograd(g) && UseWinogradF4(g))
    WinogradWeightGrad<WinogradF4>(pool, x, dy, dw, g);
  else if (UseWinograd(g))
    WinogradWeightGrad<WinogradF2>(pool, x, dy, dw, g);
  else
    WeightGrad(pool, x, dy, dw, g);
}

using F32 = ffi::Buffer<ffi::F32>;
using U8 = ffi::Buffer<ffi::U8>;

// A pooled array's shape: (n, full_h / 2, full_w / 2, c) for the unpooled image (n, full_h, full_w, c).
bool IsPooled(ffi::Span<const int64_t> pooled, int64_t n, int64_t full_h, int64_t full_w, int64_t c) {
  return pooled.size() == 4 && pooled[0] == n && pooled[1] == full_h / 2 && pooled[2] == full_w / 2 &&
         pooled[3] == c && full_h >= 2 && full_w >= 2;
}

const ffi::Error kBadPooledShape = ffi::Error::InvalidArgument("imgclf conv: pooled arrays of the wrong shape");

ffi::Error ForwardImpl(ffi::ThreadPool pool, F32 x, F32 w, ffi::ResultBuffer<ffi::F32> y, int64_t stride_h,
                       int64_t stride_w, int64_t pad_top, int64_t pad_left) {
  Geometry g;
  if (auto e = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), stride_h, stride_w, pad_top,
                            pad_left, &g);
      e.failure())
    return e;
  RunForward(pool, Plain(x.typed_data(), g.h, g.w, g.c), w.typed_data(), {y->typed_data(), nullptr, nullptr}, g);
  return ffi::Error::Success();
}

ffi::Error WeightGradImpl(ffi::ThreadPool pool, F32 x, F32 dy, ffi::ResultBuffer<ffi::F32> dw, int64_t stride_h,
                          int64_t stride_w, int64_t pad_top, int64_t pad_left) {
  Geometry g;
  if (auto e = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), stride_h, stride_w, pad_top,
                            pad_left, &g);
      e.failure())
    return e;
  RunWeightGrad(pool, Plain(x.typed_data(), g.h, g.w, g.c), Plain(dy.typed_data(), g.ho, g.wo, g.o), dw->typed_data(),
                g);
  return ffi::Error::Success();
}

// y, choice = 2x2 max-pool of ReLU(conv(x, w) + bias), the convolution's output being full_h x full_w.
ffi::Error ReluPoolImpl(ffi::ThreadPool pool, F32 x, F32 w, F32 bias, ffi::ResultBuffer<ffi::F32> y,
                        ffi::ResultBuffer<ffi::U8> choice, int64_t stride_h, int64_t stride_w, int64_t pad_top,
                        int64_t pad_left, int64_t full_h, int64_t full_w) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 4) return kBadPooledShape;
  const std::vector<int64_t> full = {xd[0], full_h, full_w, wd[3]};
  Geometry g;
  if (auto e = MakeGeometry(xd, wd, full, stride_h, stride_w, pad_top, pad_left, &g); e.failure()) return e;
  if (!IsPooled(y->dimensions(), g.n, g.ho, g.wo, g.o) || !(choice->dimensions() == y->dimensions()) ||
      bias.dimensions().size() != 1 || bias.dimensions()[0] != g.o)
    return kBadPooledShape;
  RunForward(pool, Plain(x.typed_data(), g.h, g.w, g.c), w.typed_data(),
             {y->typed_data(), bias.typed_data(), choice->typed_data()}, g);
  return ffi::Error::Success();
}

// dx of a convolution whose output gradient comes pooled (the forward kernel with the flipped kernel w).
ffi::Error PooledForwardImpl(ffi::ThreadPool pool, F32 dy, U8 choice, F32 w, ffi::ResultBuffer<ffi::F32> dx,
                             int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_left, int64_t full_h,
                             int64_t full_w) {
  const auto dd = dy.dimensions(), wd = w.dimensions();
  if (dd.size() != 4 || wd.size() != 4) return kBadPooledShape;
  const std::vector<int64_t> full = {dd[0], full_h, full_w, wd[2]};
  Geometry g;
  if (auto e = MakeGeometry(full, wd, dx->dimensions(), stride_h, stride_w, pad_top, pad_left, &g); e.failure())
    return e;
  if (!IsPooled(dd, g.n, g.h, g.w, g.c) || !(choice.dimensions() == dd)) return kBadPooledShape;
  RunForward(pool, {dy.typed_data(), choice.typed_data(), g.h, g.w, g.c}, w.typed_data(),
             {dx->typed_data(), nullptr, nullptr}, g);
  return ffi::Error::Success();
}

// dw of a convolution whose output gradient comes pooled.
ffi::Error PooledWeightGradImpl(ffi::ThreadPool pool, F32 x, F32 dy, U8 choice, ffi::ResultBuffer<ffi::F32> dw,
                                int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_left, int64_t full_h,
                                int64_t full_w) {
  const auto xd = x.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || wd.size() != 4) return kBadPooledShape;
  const std::vector<int64_t> full = {xd[0], full_h, full_w, wd[3]};
  Geometry g;
  if (auto e = MakeGeometry(xd, wd, full, stride_h, stride_w, pad_top, pad_left, &g); e.failure()) return e;
  if (!IsPooled(dy.dimensions(), g.n, g.ho, g.wo, g.o) || !(choice.dimensions() == dy.dimensions()))
    return kBadPooledShape;
  RunWeightGrad(pool, Plain(x.typed_data(), g.h, g.w, g.c), {dy.typed_data(), choice.typed_data(), g.ho, g.wo, g.o},
                dw->typed_data(), g);
  return ffi::Error::Success();
}

}  // namespace

// Every handler takes XLA's intra-op thread pool (its first argument) and the convolution's strides and leading
// padding; the pooled ones also the unpooled size of their pooled array.
static auto BindWithPool() { return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>(); }
template <typename B>
static auto ConvAttributes(B&& binding) {
  return std::move(binding)
      .template Attr<int64_t>("stride_h")
      .template Attr<int64_t>("stride_w")
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_left");
}
template <typename B>
static auto PooledAttributes(B&& binding) {
  return ConvAttributes(std::move(binding)).template Attr<int64_t>("full_h").template Attr<int64_t>("full_w");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ImgclfConvForward, ForwardImpl,
                              ConvAttributes(BindWithPool().Arg<F32>().Arg<F32>().Ret<F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ImgclfConvWeightGrad, WeightGradImpl,
                              ConvAttributes(BindWithPool().Arg<F32>().Arg<F32>().Ret<F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ImgclfConvReluPool, ReluPoolImpl,
                              PooledAttributes(BindWithPool().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().Ret<U8>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ImgclfConvPooledForward, PooledForwardImpl,
                              PooledAttributes(BindWithPool().Arg<F32>().Arg<U8>().Arg<F32>().Ret<F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ImgclfConvPooledWeightGrad, PooledWeightGradImpl,
                              PooledAttributes(BindWithPool().Arg<F32>().Arg<F32>().Arg<U8>().Ret<F32>()));

// Lets the loader refuse a CPU without the instructions the kernels were compiled for.
extern "C" int ImgclfConvCpuSupported() {
#ifdef __AVX512F__
  if (!__builtin_cpu_supports("avx512f")) return 0;
#endif
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
