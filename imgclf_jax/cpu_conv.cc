// f32 NHWC x HWIO 2-D convolutions for XLA:CPU on x86-64 with AVX2 + FMA or AVX-512, called through the XLA FFI.
//
// Why: XLA:CPU's own convolutions reach 15-60% of this machine's matmul peak on small CNNs (a 3-channel first
// layer runs at 15 GFLOP/s, and weight gradients pay for layout transposes); docs/performance.md has the
// figures. Both kernels here are register-blocked "direct" convolutions: no im2col matrix is built,
// because at one output pixel and one kernel row the kw*C input values a convolution reads are contiguous
// in an NHWC image, whatever the stride. Each image is first copied into a zero-bordered buffer (so no
// bounds checks in the inner loops), which stays in the core's cache while it is used.
//
//   forward:          y[n,oy,ox,o] = sum_{i,l} xpad[n, oy*sh+i, ox*sw .. , l] * w[i, l, o]
//   weight gradient:  dw[i, l, o]  = sum_{n,oy,ox} xpad[n, oy*sh+i, ox*sw .., l] * dy[n, oy, ox, o]
//
// (l runs over the kw*C contiguous values of kernel row i.) The input gradient of a stride-1 convolution is
// the forward kernel applied to dy with the flipped, transposed kernel (done in imgclf_jax/cpu_conv.py).
// Work is handed out in chunks of images (or output rows) to one thread per core (IMGCLF_CONV_THREADS sets
// another count); the weight gradient adds one partial sum per chunk in a fixed order, so a result never
// depends on thread timing. Results equal XLA's up to float rounding (tests/test_conv.py).

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
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
// operations beside ours) takes fewer chunks instead of holding the others up at the end.
template <typename F>
void ParallelChunks(int64_t count, int64_t chunk, int threads, F&& body) {
  std::atomic<int64_t> next_item{0};
  auto next = [&](int64_t* begin, int64_t* end) {
    *begin = next_item.fetch_add(chunk);
    if (*begin >= count) return false;
    *end = std::min(count, *begin + chunk);
    return true;
  };
  threads = static_cast<int>(std::min<int64_t>(threads, (count + chunk - 1) / chunk));
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

template <typename T>
inline T Load(const float* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
inline void Store(float* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}

// GCC/Clang vector extensions (+ - * ?: work on them): 8 floats, and kLanes floats for the matrix tiles.
using Vec8 = float __attribute__((vector_size(32)));
using Vec16 = float __attribute__((vector_size(64)));
using VecL = std::conditional_t<kLanes == 16, Vec16, Vec8>;

// Calls body(k, T{}) for channels k = 0, 8, 16, ... with T = Vec8, then one at a time with T = float.
template <typename F>
inline void ForChannels(int64_t count, F&& body) {
  int64_t k = 0;
  for (; k + 8 <= count; k += 8) body(k, Vec8{});
  for (; k < count; ++k) body(k, 0.0f);
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
  float positions[sizeof(T) / sizeof(float)];
  Store(positions, positive ? at : zero + 4.0f);
  for (size_t l = 0; l < sizeof(T) / sizeof(float); ++l) choice[l] = static_cast<uint8_t>(positions[l]);
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
  static const Fn table[kMaxRows][3] = {
      {K<1, 1, Vec8>::fn, K<1, 1, VecL>::fn, K<1, 2, VecL>::fn}, {K<2, 1, Vec8>::fn, K<2, 1, VecL>::fn, K<2, 2, VecL>::fn},
      {K<3, 1, Vec8>::fn, K<3, 1, VecL>::fn, K<3, 2, VecL>::fn}, {K<4, 1, Vec8>::fn, K<4, 1, VecL>::fn, K<4, 2, VecL>::fn},
      {K<5, 1, Vec8>::fn, K<5, 1, VecL>::fn, K<5, 2, VecL>::fn}, {K<6, 1, Vec8>::fn, K<6, 1, VecL>::fn, K<6, 2, VecL>::fn}};
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

void Forward(const ImageSource& x, const float* w, const Output& out, const Geometry& g) {
  const std::vector<float> packed = PackKernel(w, g);
  const int threads = NumThreads();
  const int64_t per_image = out.pooled() ? g.ho / 2 : g.ho;  // Items: output rows, or pairs when pooling.
  ParallelChunks(g.n * per_image, RowChunk(g.n, per_image, threads), threads, [&](int, auto& next) {
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

void WeightGrad(const ImageSource& x, const ImageSource& dy, float* dw, const Geometry& g) {
  const int64_t op = g.op(), len = g.len(), rows = g.kh * len;
  // One partial sum per chunk of output rows (a fixed split, whichever thread takes a chunk), added up in
  // chunk order: the result does not depend on how the threads happened to share the work.
  const int threads = NumThreads();
  const int64_t items = g.n * g.ho, chunk = WeightGradChunk(g.n, g.ho, rows * op, threads);
  std::vector<std::vector<float>> partial((items + chunk - 1) / chunk);
  ParallelChunks(items, chunk, threads, [&](int, auto& next) {
    std::vector<float> buf(g.hp * g.wp * g.c);
    const bool copy_dy = g.o != op || dy.choice != nullptr;
    std::vector<float> dy_copy(copy_dy ? g.ho * g.wo * op : 0, 0.0f);
    std::vector<int64_t> a_offsets(kTilePixels), d_offsets(kTilePixels);
    int64_t item, end;
    while (next(&item, &end)) {
      std::vector<float>& total = partial[item / chunk];
      total.assign(rows * op, 0.0f);
      while (item < end) {  // The rows [item, end) may span images: one image at a time.
        const int64_t image = item / g.ho;
        const int64_t image_end = std::min(end, (image + 1) * g.ho);
        PadImage(x, g, image, buf.data());
        const float* d = dy.data + image * g.ho * g.wo * g.o;
        int64_t d_stride = g.o;
        if (copy_dy) {  // Pixels of whole vectors (zero-padded), expanded from a pooled gradient if need be.
          for (int64_t oy = 0; oy < g.ho; ++oy) dy.Row(image, oy, 0, g.wo, &dy_copy[oy * g.wo * op], op);
          d = dy_copy.data();
          d_stride = op;
        }
        // Tiles of up to kTilePixels output pixels of this image, in rows [item, image_end).
        int64_t pixel = (item % g.ho) * g.wo;
        const int64_t pixel_end = (image_end - image * g.ho) * g.wo;
        while (pixel < pixel_end) {
          const int64_t tile = std::min(kTilePixels, pixel_end - pixel);
          for (int64_t p = 0; p < tile; ++p) {
            const int64_t oy = (pixel + p) / g.wo, ox = (pixel + p) % g.wo;
            a_offsets[p] = (oy * g.sh * g.wp + ox * g.sw) * g.c;
            d_offsets[p] = (pixel + p) * d_stride;
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
// Winograd F(2x2, 3x3) for 3x3 stride-1 convolutions with at least kWinogradMinChannels input channels.
//
// Each 2x2 block of outputs ("tile") is computed from the 4x4 input window under it as
//   Y = A^T [ (G w G^T) (.) (B^T d B) ] A
// (Lavin & Gray, 2016): 16 elementwise products per input/output channel pair instead of 36 multiply-adds,
// so 2.25x less arithmetic. The 16 products summed over input channels are 16 small matrix products
// (tiles x C) . (C x O), which run in ForwardTile; the transforms are additions. The weight gradient is the
// adjoint: dW = G^T [ sum over tiles (B^T d B) (.) (A dY A^T) ] G, whose inner sums are WeightGradTile's.
// The transforms' coefficients are 0, +-1 and +-1/2, so results differ from a direct convolution by float
// rounding only (tests/test_conv.py compares with XLA's).

constexpr int64_t kWinogradTiles = 192;       // Tiles per block: one position's share stays in L1/L2.
constexpr int64_t kWinogradMinChannels = 8;   // Fewer input channels: the direct kernels do better.
                                              // (cpu_conv.py's WINOGRAD_MIN_CHANNELS is the same.)

bool UseWinograd(const Geometry& g) {
  return g.kh == 3 && g.kw == 3 && g.sh == 1 && g.sw == 1 && g.c >= kWinogradMinChannels;
}

struct WinogradShape {
  int64_t th, tw, tiles, blocks;  // tiles down and across one image, per image, blocks of tiles per image
  explicit WinogradShape(const Geometry& g)
      : th((g.ho + 1) / 2), tw((g.wo + 1) / 2), tiles(th * tw), blocks((th * tw + kWinogradTiles - 1) / kWinogradTiles) {}
};

// The geometry whose padded buffer covers whole 4x4 windows of every tile.
Geometry WinogradPadded(Geometry g) {
  const WinogradShape s(g);
  g.hp = 2 * s.th + 2;
  g.wp = 2 * s.tw + 2;
  return g;
}

// v[xi][t][k] = (B^T d B)[xi] for the 4x4 window of tile `first + t` of the padded image, t < count.
void InputTransform(const float* buf, const Geometry& g, const WinogradShape& s, int64_t first, int64_t count,
                    float* v) {
  const int64_t c = g.c, row = g.wp * c, plane = count * c;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t ty = (first + t) / s.tw, tx = (first + t) % s.tw;
    const float* d = buf + 2 * ty * row + 2 * tx * c;
    float* out = v + t * c;
    ForChannels(c, [&](int64_t k, auto zero) {
      using T = decltype(zero);
      T x[4][4], bt[4][4];
      for (int r = 0; r < 4; ++r)
        for (int q = 0; q < 4; ++q) x[r][q] = Load<T>(d + r * row + q * c + k);
      for (int q = 0; q < 4; ++q) {
        bt[0][q] = x[0][q] - x[2][q];
        bt[1][q] = x[1][q] + x[2][q];
        bt[2][q] = x[2][q] - x[1][q];
        bt[3][q] = x[1][q] - x[3][q];
      }
      for (int r = 0; r < 4; ++r) {
        Store(out + (4 * r + 0) * plane + k, bt[r][0] - bt[r][2]);
        Store(out + (4 * r + 1) * plane + k, bt[r][1] + bt[r][2]);
        Store(out + (4 * r + 2) * plane + k, bt[r][2] - bt[r][1]);
        Store(out + (4 * r + 3) * plane + k, bt[r][1] - bt[r][3]);
      }
    });
  }
}

// u[xi][k][o] = (G w G^T)[xi] for the kernel's (k, o) 3x3 slice; output channels padded to op with zeros.
std::vector<float> KernelTransform(const float* w, const Geometry& g) {
  const int64_t op = g.op(), ko = g.c * op;
  std::vector<float> u(16 * ko, 0.0f);
  for (int64_t k = 0; k < g.c; ++k) {
    for (int64_t o = 0; o < g.o; ++o) {
      float x[3][3], gx[4][3];
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) x[i][j] = w[((i * 3 + j) * g.c + k) * g.o + o];
      for (int j = 0; j < 3; ++j) {
        gx[0][j] = x[0][j];
        gx[1][j] = 0.5f * (x[0][j] + x[1][j] + x[2][j]);
        gx[2][j] = 0.5f * (x[0][j] - x[1][j] + x[2][j]);
        gx[3][j] = x[2][j];
      }
      for (int r = 0; r < 4; ++r) {
        float* dst = &u[(4 * r) * ko + k * op + o];
        dst[0 * ko] = gx[r][0];
        dst[1 * ko] = 0.5f * (gx[r][0] + gx[r][1] + gx[r][2]);
        dst[2 * ko] = 0.5f * (gx[r][0] - gx[r][1] + gx[r][2]);
        dst[3 * ko] = gx[r][2];
      }
    }
  }
  return u;
}

// Tiles `first + t` (t < count) of image `image` from m[xi][t][o]: Y = A^T m A, cut at the image's edge; or,
// for a pooled output, each tile's 2x2 outputs are one pooling window.
void OutputTransform(const float* m, const Geometry& g, const WinogradShape& s, int64_t first, int64_t count,
                     const Output& out, int64_t image) {
  const int64_t op = g.op(), plane = count * op, ph = g.ho / 2, pw = g.wo / 2;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t ty = (first + t) / s.tw, tx = (first + t) % s.tw;
    if (out.pooled() && (ty >= ph || tx >= pw)) continue;  // Outputs the pooling drops.
    const int rows = 2 * ty + 1 < g.ho ? 2 : 1, cols = 2 * tx + 1 < g.wo ? 2 : 1;
    const float* src = m + t * op;
    const int64_t at = out.pooled() ? ((image * ph + ty) * pw + tx) * g.o
                                    : ((image * g.ho + 2 * ty) * g.wo + 2 * tx) * g.o;
    ForChannels(g.o, [&](int64_t o, auto zero) {
      using T = decltype(zero);
      T x[4][4], a[2][4], y[2][2];
      for (int r = 0; r < 4; ++r)
        for (int q = 0; q < 4; ++q) x[r][q] = Load<T>(src + (4 * r + q) * plane + o);
      for (int q = 0; q < 4; ++q) {
        a[0][q] = x[0][q] + x[1][q] + x[2][q];
        a[1][q] = x[1][q] - x[2][q] - x[3][q];
      }
      for (int r = 0; r < 2; ++r) {
        y[r][0] = a[r][0] + a[r][1] + a[r][2];
        y[r][1] = a[r][1] - a[r][2] - a[r][3];
      }
      if (out.pooled()) {
        PoolWindow(y[0][0], y[0][1], y[1][0], y[1][1], Load<T>(out.bias + o), out.y + at + o, out.choice + at + o);
        return;
      }
      for (int r = 0; r < rows; ++r)
        for (int q = 0; q < cols; ++q) Store(out.y + at + (r * g.wo + q) * g.o + o, y[r][q]);
    });
  }
}

// e[xi][t][o] = (A dY A^T)[xi] for tile `first + t`'s 2x2 output gradients (zero beyond the image's edge);
// output channels padded to op with zeros.
void OutputGradTransform(const float* dy_image, const Geometry& g, const WinogradShape& s, int64_t first,
                         int64_t count, float* e) {
  const int64_t op = g.op(), plane = count * op;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t ty = (first + t) / s.tw, tx = (first + t) % s.tw;
    const bool row1 = 2 * ty + 1 < g.ho, col1 = 2 * tx + 1 < g.wo;
    const float* src = dy_image + (2 * ty * g.wo + 2 * tx) * g.o;
    float* out = e + t * op;
    ForChannels(g.o, [&](int64_t o, auto zero) {
      using T = decltype(zero);
      const T d00 = Load<T>(src + o), d01 = col1 ? Load<T>(src + g.o + o) : zero;
      const T d10 = row1 ? Load<T>(src + g.wo * g.o + o) : zero;
      const T d11 = row1 && col1 ? Load<T>(src + (g.wo + 1) * g.o + o) : zero;
      const T col[4][2] = {{d00, d01}, {d00 + d10, d01 + d11}, {d00 - d10, d01 - d11}, {-d10, -d11}};
      for (int r = 0; r < 4; ++r) {
        Store(out + (4 * r + 0) * plane + o, col[r][0]);
        Store(out + (4 * r + 1) * plane + o, col[r][0] + col[r][1]);
        Store(out + (4 * r + 2) * plane + o, col[r][0] - col[r][1]);
        Store(out + (4 * r + 3) * plane + o, -col[r][1]);
      }
    });
    if (g.o != op)
      for (int xi = 0; xi < 16; ++xi) std::memset(out + xi * plane + g.o, 0, sizeof(float) * (op - g.o));
  }
}

void WinogradForward(const ImageSource& x, const float* w, const Output& out, const Geometry& geometry) {
  const Geometry g = WinogradPadded(geometry);
  const WinogradShape s(g);
  const std::vector<float> u = KernelTransform(w, g);
  const int64_t op = g.op(), c = g.c;
  const int threads = NumThreads();
  const int64_t chunk = g.n >= 4 * threads ? s.blocks : 1;
  ParallelChunks(g.n * s.blocks, chunk, threads, [&](int, auto& next) {
    std::vector<float> buf(g.hp * g.wp * c), v(16 * kWinogradTiles * c), m(16 * kWinogradTiles * op);
    int64_t padded_image = -1, begin, end;
    while (next(&begin, &end)) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t image = item / s.blocks, first = (item % s.blocks) * kWinogradTiles;
        const int64_t count = std::min(kWinogradTiles, s.tiles - first);
        if (image != padded_image) {
          PadImage(x, g, image, buf.data());
          padded_image = image;
        }
        InputTransform(buf.data(), g, s, first, count, v.data());
        for (int64_t xi = 0; xi < 16; ++xi) {
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
        OutputTransform(m.data(), g, s, first, count, out, image);
      }
    }
  });
}

void WinogradWeightGrad(const ImageSource& x, const ImageSource& dy, float* dw, const Geometry& geometry) {
  const Geometry g = WinogradPadded(geometry);
  const WinogradShape s(g);
  const int64_t op = g.op(), c = g.c, size = 16 * c * op;
  const int threads = NumThreads();
  const int64_t items = g.n * s.blocks, chunk = WeightGradChunk(g.n, s.blocks, size, threads);
  std::vector<std::vector<float>> partial((items + chunk - 1) / chunk);
  ParallelChunks(items, chunk, threads, [&](int, auto& next) {
    std::vector<float> buf(g.hp * g.wp * c), v(16 * kWinogradTiles * c), e(16 * kWinogradTiles * op);
    std::vector<int64_t> v_offsets(kWinogradTiles), e_offsets(kWinogradTiles);
    std::vector<float> dy_expanded(dy.choice != nullptr ? g.ho * g.wo * g.o : 0);
    int64_t padded_image = -1, begin, end;
    while (next(&begin, &end)) {
      std::vector<float>& total = partial[begin / chunk];
      total.assign(size, 0.0f);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t image = item / s.blocks, first = (item % s.blocks) * kWinogradTiles;
        const int64_t count = std::min(kWinogradTiles, s.tiles - first);
        const float* dy_image = dy.data + image * g.ho * g.wo * g.o;
        if (image != padded_image) {
          PadImage(x, g, image, buf.data());
          if (dy.choice != nullptr)
            for (int64_t oy = 0; oy < g.ho; ++oy) dy.Row(image, oy, 0, g.wo, &dy_expanded[oy * g.wo * g.o], g.o);
          padded_image = image;
        }
        if (dy.choice != nullptr) dy_image = dy_expanded.data();
        InputTransform(buf.data(), g, s, first, count, v.data());
        OutputGradTransform(dy_image, g, s, first, count, e.data());
        for (int64_t t = 0; t < count; ++t) {
          v_offsets[t] = t * c;
          e_offsets[t] = t * op;
        }
        for (int64_t xi = 0; xi < 16; ++xi) {
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
      float m[4][4], gm[3][4];
      for (int xi = 0; xi < 16; ++xi) m[xi / 4][xi % 4] = sum[(xi * c + k) * op + o];
      for (int q = 0; q < 4; ++q) {
        gm[0][q] = m[0][q] + 0.5f * (m[1][q] + m[2][q]);
        gm[1][q] = 0.5f * (m[1][q] - m[2][q]);
        gm[2][q] = 0.5f * (m[1][q] + m[2][q]) + m[3][q];
      }
      for (int i = 0; i < 3; ++i) {
        float* dst = dw + (i * 3 * c + k) * g.o + o;
        dst[0] = gm[i][0] + 0.5f * (gm[i][1] + gm[i][2]);
        dst[c * g.o] = 0.5f * (gm[i][1] - gm[i][2]);
        dst[2 * c * g.o] = 0.5f * (gm[i][1] + gm[i][2]) + gm[i][3];
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

void RunForward(const ImageSource& x, const float* w, const Output& out, const Geometry& g) {
  if (UseWinograd(g))
    WinogradForward(x, w, out, g);
  else
    Forward(x, w, out, g);
}

void RunWeightGrad(const ImageSource& x, const ImageSource& dy, float* dw, const Geometry& g) {
  if (UseWinograd(g))
    WinogradWeightGrad(x, dy, dw, g);
  else
    WeightGrad(x, dy, dw, g);
}

using F32 = ffi::Buffer<ffi::F32>;
using U8 = ffi::Buffer<ffi::U8>;

// A pooled array's shape: (n, full_h / 2, full_w / 2, c) for the unpooled image (n, full_h, full_w, c).
bool IsPooled(ffi::Span<const int64_t> pooled, int64_t n, int64_t full_h, int64_t full_w, int64_t c) {
  return pooled.size() == 4 && pooled[0] == n && pooled[1] == full_h / 2 && pooled[2] == full_w / 2 &&
         pooled[3] == c && full_h >= 2 && full_w >= 2;
}

const ffi::Error kBadPooledShape = ffi::Error::InvalidArgument("imgclf conv: pooled arrays of the wrong shape");

ffi::Error ForwardImpl(F32 x, F32 w, ffi::ResultBuffer<ffi::F32> y, int64_t stride_h, int64_t stride_w,
                       int64_t pad_top, int64_t pad_left) {
  Geometry g;
  if (auto e = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), stride_h, stride_w, pad_top,
                            pad_left, &g);
      e.failure())
    return e;
  RunForward(Plain(x.typed_data(), g.h, g.w, g.c), w.typed_data(), {y->typed_data(), nullptr, nullptr}, g);
  return ffi::Error::Success();
}

ffi::Error WeightGradImpl(F32 x, F32 dy, ffi::ResultBuffer<ffi::F32> dw, int64_t stride_h, int64_t stride_w,
                          int64_t pad_top, int64_t pad_left) {
  Geometry g;
  if (auto e = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), stride_h, stride_w, pad_top,
                            pad_left, &g);
      e.failure())
    return e;
  RunWeightGrad(Plain(x.typed_data(), g.h, g.w, g.c), Plain(dy.typed_data(), g.ho, g.wo, g.o), dw->typed_data(), g);
  return ffi::Error::Success();
}

// y, choice = 2x2 max-pool of ReLU(conv(x, w) + bias), the convolution's output being full_h x full_w.
ffi::Error ReluPoolImpl(F32 x, F32 w, F32 bias, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::U8> choice,
                        int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_left, int64_t full_h,
                        int64_t full_w) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 4) return kBadPooledShape;
  const std::vector<int64_t> full = {xd[0], full_h, full_w, wd[3]};
  Geometry g;
  if (auto e = MakeGeometry(xd, wd, full, stride_h, stride_w, pad_top, pad_left, &g); e.failure()) return e;
  if (!IsPooled(y->dimensions(), g.n, g.ho, g.wo, g.o) || !(choice->dimensions() == y->dimensions()) ||
      bias.dimensions().size() != 1 || bias.dimensions()[0] != g.o)
    return kBadPooledShape;
  RunForward(Plain(x.typed_data(), g.h, g.w, g.c), w.typed_data(),
             {y->typed_data(), bias.typed_data(), choice->typed_data()}, g);
  return ffi::Error::Success();
}

// dx of a convolution whose output gradient comes pooled (the forward kernel with the flipped kernel w).
ffi::Error PooledForwardImpl(F32 dy, U8 choice, F32 w, ffi::ResultBuffer<ffi::F32> dx, int64_t stride_h,
                             int64_t stride_w, int64_t pad_top, int64_t pad_left, int64_t full_h, int64_t full_w) {
  const auto dd = dy.dimensions(), wd = w.dimensions();
  if (dd.size() != 4 || wd.size() != 4) return kBadPooledShape;
  const std::vector<int64_t> full = {dd[0], full_h, full_w, wd[2]};
  Geometry g;
  if (auto e = MakeGeometry(full, wd, dx->dimensions(), stride_h, stride_w, pad_top, pad_left, &g); e.failure())
    return e;
  if (!IsPooled(dd, g.n, g.h, g.w, g.c) || !(choice.dimensions() == dd)) return kBadPooledShape;
  RunForward({dy.typed_data(), choice.typed_data(), g.h, g.w, g.c}, w.typed_data(), {dx->typed_data(), nullptr, nullptr},
             g);
  return ffi::Error::Success();
}

// dw of a convolution whose output gradient comes pooled.
ffi::Error PooledWeightGradImpl(F32 x, F32 dy, U8 choice, ffi::ResultBuffer<ffi::F32> dw, int64_t stride_h,
                                int64_t stride_w, int64_t pad_top, int64_t pad_left, int64_t full_h,
                                int64_t full_w) {
  const auto xd = x.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || wd.size() != 4) return kBadPooledShape;
  const std::vector<int64_t> full = {xd[0], full_h, full_w, wd[3]};
  Geometry g;
  if (auto e = MakeGeometry(xd, wd, full, stride_h, stride_w, pad_top, pad_left, &g); e.failure()) return e;
  if (!IsPooled(dy.dimensions(), g.n, g.ho, g.wo, g.o) || !(choice.dimensions() == dy.dimensions()))
    return kBadPooledShape;
  RunWeightGrad(Plain(x.typed_data(), g.h, g.w, g.c), {dy.typed_data(), choice.typed_data(), g.ho, g.wo, g.o},
                dw->typed_data(), g);
  return ffi::Error::Success();
}

}  // namespace

// Every handler takes the convolution's strides and leading padding; the pooled ones also the unpooled size
// of their pooled array.
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
                              ConvAttributes(ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ImgclfConvWeightGrad, WeightGradImpl,
                              ConvAttributes(ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ImgclfConvReluPool, ReluPoolImpl,
                              PooledAttributes(ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().Ret<U8>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ImgclfConvPooledForward, PooledForwardImpl,
                              PooledAttributes(ffi::Ffi::Bind().Arg<F32>().Arg<U8>().Arg<F32>().Ret<F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ImgclfConvPooledWeightGrad, PooledWeightGradImpl,
                              PooledAttributes(ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<U8>().Ret<F32>()));

// Lets the loader refuse a CPU without the instructions the kernels were compiled for.
extern "C" int ImgclfConvCpuSupported() {
#ifdef __AVX512F__
  if (!__builtin_cpu_supports("avx512f")) return 0;
#endif
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
