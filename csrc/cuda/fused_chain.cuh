// A narrow MLP chain in one kernel, the tile walk of both:
// - fused_step_kernel (fastmlp::mlp_bce_step): the whole training step of an MLP
//   classifier. For each tile of input rows (16 to 64, as the planner sizes
//   them to fill the SMs) a block runs the first layer (input and weight
//   streamed through shared memory in chunks of kChainChunk features, the next
//   chunk's loads in flight while the current one is multiplied), the narrow
//   layers above it with their activations kept in shared memory, the BCE loss
//   and its logits gradient, and the backward through every layer, adding the
//   tile's parameter gradients into per-block accumulators (in shared memory
//   when they fit, else in the block's own slice of the workspace).
//   fused_step_finish_kernel sums the per-block partials in block order:
//   deterministic, no floating-point atomics. Only the gradients and the loss
//   are written to memory; the input is read by the forward and once more by
//   the first layer's weight gradient, right after, while the tile is still in
//   L2. The planner (host) sizes the tiles and the grid from the SM count and
//   lays out the shared memory; the kernels read that layout from their
//   parameters.
// - fused_forward_kernel (fastmlp::mlp_forward): the same forward, writing every
//   layer's activations for the backward.
//
// Eligible chains: at most kChainMaxLayers layers, every layer at most
// kChainMaxWidth wide (the first layer's input of any width), and tile buffers
// that fit the device's shared memory.
// Pure CUDA (no torch): also compiled by the CPU emulation harness.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <algorithm>

#include "common/math.h"
#include "cuda/bce.cuh"
#include "cuda/gemm.cuh"
#include "cuda/launch.cuh"

namespace fastmlp::cuda {

constexpr int kChainMaxLayers = 8;
constexpr int kChainMaxWidth = 128;
// Rows of a tile: the planner picks kChainMaxRows, or fewer (down to
// kChainMinRows) when a batch has too few tiles of that size to fill the SMs.
constexpr int kChainMaxRows = 64;
constexpr int kChainMinRows = 16;
constexpr int kChainChunk = 32;   // input features staged at a time
constexpr int kChainThreads = 256;
// The kernels are compiled for first layers of at most kNarrowFirst outputs
// (the 784 -> 30 case) and of at most kChainMaxWidth, so a narrow first layer
// does not run the register tiles of a 128-wide one.
constexpr int kNarrowFirst = 32;
// Resident blocks per SM a kernel is compiled for (__launch_bounds__) and the
// planner assumes: two for the float-accumulating narrow-first kernels (at most
// 128 registers a thread, 65536 per SM; ptxas: ~120, no spills), one for the
// others (their 128-wide register tiles, or double, take up to ~230).
template <typename scalar_t, int kFirstWidth> constexpr int chain_blocks_per_sm() {
  return kFirstWidth <= kNarrowFirst && sizeof(acc_t<scalar_t>) == 4 ? 2 : 1;
}
// First-layer forward: a 16 x 16 thread grid, each thread up to 4 rows (tile
// rows / 16) x up to kFirstWidth / 16 columns.
constexpr int kChainGridX = 16;
constexpr int kChainGridY = kChainThreads / kChainGridX;
constexpr int kChainRowsPerThread = kChainMaxRows / kChainGridY;
// First-layer weight gradient: thread = (feature in the chunk, group of output
// rows), up to kFirstWidth / kChainGroups rows each.
constexpr int kChainGroups = kChainThreads / kChainChunk;
static_assert(kChainThreads == kBceThreads, "the loss partial is summed with block_sum");
static_assert(kChainMinRows == kChainGridY && kChainMaxRows % kChainGridY == 0 && kChainThreads % kChainChunk == 0,
              "tile shape: every tile size a multiple of the thread grid's rows");

// Row pitch of a shared-memory row of `width` values: odd, so threads walking
// down a column hit distinct banks.
FASTMLP_HD int pitch_of(int width) { return width | 1; }
constexpr int kXPitch = kChainChunk + 1;

// Offsets (in accumulator elements) of the kernel's dynamic shared memory,
// computed on the host by the planner and passed in with the parameters.
struct ChainSmemLayout {
  int64_t grads = 0;                   // the block's gradient accumulators (grads_in_smem)
  int64_t act[kChainMaxLayers] = {};   // layer outputs, [tile_rows, pitch_of(width[l])]
  int64_t grad_a = 0, grad_b = 0;      // ping-pong gradients, rows of the layer's pitch
  int64_t x_tile = 0;                  // [tile_rows, kXPitch] input chunk
  int64_t w_tile = 0;                  // [kChainChunk, pitch_of(width[0])] first-layer weight chunk
  int64_t scratch = 0;                 // [kChainThreads] for block_sum (the step kernel)
  int64_t total = 0;
};

FASTMLP_HD int64_t round_up4(int64_t n) { return (n + 3) / 4 * 4; }

template <typename scalar_t> struct FusedChainParams {
  int64_t batch = 0, in_features = 0;
  int layers = 0;
  int width[kChainMaxLayers] = {};            // output features of each layer
  Strided<scalar_t> input;                   // [batch, in_features]
  const scalar_t* weight[kChainMaxLayers] = {};  // contiguous [width[l], fan_in(l)]
  const scalar_t* bias[kChainMaxLayers] = {};    // [width[l]] or nullptr
  bool last_relu = false;
  const scalar_t* target = nullptr;          // contiguous [batch, width[layers - 1]]
  BcePattern<scalar_t> loss_weight, pos_weight;
  acc_t<scalar_t> scale = 1;                 // 1 / numel for a mean, 1 for a sum
  int lowest = 0;                            // lowest layer the backward visits
  // Outputs; a null gradient is not computed.
  scalar_t* loss = nullptr;                  // a scalar
  scalar_t* grad_input = nullptr;            // contiguous [batch, in_features]
  scalar_t* grad_weight[kChainMaxLayers] = {};
  scalar_t* grad_bias[kChainMaxLayers] = {};
  // The forward-only kernel's outputs instead: each layer's activations,
  // contiguous [batch, width[l]].
  scalar_t* activation[kChainMaxLayers] = {};
  bool forward_only = false;
  // Set by plan_fused_step: a block's partial gradients hold, layer by layer,
  // the weight gradient (if asked for) from grad_offset[l], then the bias
  // gradient (if asked for) from bias_offset[l]; the total at grad_offset[layers].
  int64_t grad_offset[kChainMaxLayers + 1] = {};
  int64_t bias_offset[kChainMaxLayers] = {};
  bool grads_in_smem = false;
  int tile_rows = kChainMaxRows;
  ChainSmemLayout smem;  // for tile_rows, forward_only and grads_in_smem

  FASTMLP_HD int64_t fan_in(int l) const { return l == 0 ? in_features : width[l - 1]; }
  FASTMLP_HD bool relu_after(int l) const { return l + 1 < layers || last_relu; }
};


template <typename scalar_t> FASTMLP_HD ChainSmemLayout chain_smem_layout(const FusedChainParams<scalar_t>& p) {
  ChainSmemLayout s;
  int64_t at = p.grads_in_smem ? round_up4(p.grad_offset[p.layers]) : 0;
  int max_pitch = 0;
  for (int l = 0; l < p.layers; ++l) {
    s.act[l] = at;
    at += round_up4(static_cast<int64_t>(p.tile_rows) * pitch_of(p.width[l]));
    if (pitch_of(p.width[l]) > max_pitch) max_pitch = pitch_of(p.width[l]);
  }
  const int64_t grad_elems = p.forward_only ? 0 : round_up4(static_cast<int64_t>(p.tile_rows) * max_pitch);
  s.grad_a = at;
  s.grad_b = at + grad_elems;
  s.x_tile = s.grad_b + grad_elems;
  s.w_tile = s.x_tile + round_up4(static_cast<int64_t>(p.tile_rows) * kXPitch);
  s.scratch = s.w_tile + round_up4(static_cast<int64_t>(kChainChunk) * pitch_of(p.width[0]));
  s.total = s.scratch + (p.forward_only ? 0 : kChainThreads);
  return s;
}

// One chunk of kChainChunk features of the tile's input and of the first
// layer's weight, held in registers between its loads from global memory and
// its stores to shared memory: the next chunk's loads are issued before the
// current chunk is multiplied, so their latency hides behind that work.
//   xs[r][k] = input(r0 + r, k0 + k), zero outside the tile's rows and the features;
//   ws[k][n] = weight[0](n, k0 + k), zero past the features.
template <int kFirstWidth, typename scalar_t> struct ChunkStage {
  using acc = acc_t<scalar_t>;
  static constexpr int kXPerThread = kChainMaxRows * kChainChunk / kChainThreads;
  static constexpr int kWPerThread = (kFirstWidth * kChainChunk + kChainThreads - 1) / kChainThreads;
  acc x[kXPerThread];
  acc w[kWPerThread];

  // Element e of the input chunk: walk along the input's unit stride, so the loads coalesce.
  __device__ __forceinline__ static void x_coords(const FusedChainParams<scalar_t>& p, int e, int* r, int* k) {
    const bool k_fastest = p.input.col_stride == 1 || p.input.row_stride != 1;
    *r = k_fastest ? e / kChainChunk : e % p.tile_rows;
    *k = k_fastest ? e % kChainChunk : e / p.tile_rows;
  }

  __device__ __forceinline__ void load(const FusedChainParams<scalar_t>& p, int64_t r0, int rows, int64_t k0,
                                       bool want_x, bool want_w) {
    const int64_t K = p.in_features;
    if (want_x) {
#pragma unroll
      for (int j = 0; j < kXPerThread; ++j) {
        const int e = threadIdx.x + j * kChainThreads;
        int r = 0, k = 0;
        x_coords(p, e, &r, &k);
        x[j] = e < p.tile_rows * kChainChunk && r < rows && k0 + k < K ? static_cast<acc>(p.input.at(r0 + r, k0 + k))
                                                                       : acc(0);
      }
    }
    if (want_w) {
      const int count = p.width[0] * kChainChunk;
#pragma unroll
      for (int j = 0; j < kWPerThread; ++j) {
        const int e = threadIdx.x + j * kChainThreads;
        const int n = e / kChainChunk, k = e % kChainChunk;
        w[j] = e < count && k0 + k < K ? static_cast<acc>(p.weight[0][n * K + k0 + k]) : acc(0);
      }
    }
  }

  __device__ __forceinline__ void store(const FusedChainParams<scalar_t>& p, acc* xs, acc* ws, bool want_x,
                                        bool want_w) const {
    if (want_x) {
#pragma unroll
      for (int j = 0; j < kXPerThread; ++j) {
        const int e = threadIdx.x + j * kChainThreads;
        int r = 0, k = 0;
        x_coords(p, e, &r, &k);
        if (e < p.tile_rows * kChainChunk) xs[r * kXPitch + k] = x[j];
      }
    }
    if (want_w) {
      const int count = p.width[0] * kChainChunk, pitch = pitch_of(p.width[0]);
#pragma unroll
      for (int j = 0; j < kWPerThread; ++j) {
        const int e = threadIdx.x + j * kChainThreads;
        if (e < count) ws[(e % kChainChunk) * pitch + e / kChainChunk] = w[j];
      }
    }
  }
};

// act[0] = act(input tile . weight[0]^T + bias[0]), register micro-tiles.
template <int kFirstWidth, typename scalar_t>
__device__ __forceinline__ void first_layer_forward(const FusedChainParams<scalar_t>& p, const ChainSmemLayout& lay,
                                                    acc_t<scalar_t>* s, int64_t r0, int rows) {
  using acc = acc_t<scalar_t>;
  constexpr int kCols = kFirstWidth / kChainGridX;
  const int tx = threadIdx.x % kChainGridX, ty = threadIdx.x / kChainGridX;
  const int row_steps = p.tile_rows / kChainGridY;  // rows of the tile this thread computes
  const int n0 = p.width[0], pitch = pitch_of(n0);
  acc* const xs = s + lay.x_tile;
  acc* const ws = s + lay.w_tile;
  acc sum[kChainRowsPerThread][kCols];
#pragma unroll
  for (int i = 0; i < kChainRowsPerThread; ++i)
#pragma unroll
    for (int j = 0; j < kCols; ++j) sum[i][j] = acc(0);

  ChunkStage<kFirstWidth, scalar_t> stage;
  stage.load(p, r0, rows, 0, true, true);
  for (int64_t k0 = 0; k0 < p.in_features; k0 += kChainChunk) {
    __syncthreads();  // the buffers' previous contents are consumed
    stage.store(p, xs, ws, true, true);
    __syncthreads();
    if (k0 + kChainChunk < p.in_features) stage.load(p, r0, rows, k0 + kChainChunk, true, true);
#pragma unroll 4
    for (int k = 0; k < kChainChunk; ++k) {
      acc a[kChainRowsPerThread], b[kCols];
#pragma unroll
      for (int i = 0; i < kChainRowsPerThread; ++i) {
        a[i] = i < row_steps ? xs[(ty + i * kChainGridY) * kXPitch + k] : acc(0);  // no row past the tile's buffer
      }
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int n = tx + j * kChainGridX;
        b[j] = n < n0 ? ws[k * pitch + n] : acc(0);
      }
#pragma unroll
      for (int i = 0; i < kChainRowsPerThread; ++i) {
        if (i >= row_steps) continue;
#pragma unroll
        for (int j = 0; j < kCols; ++j) sum[i][j] += a[i] * b[j];
      }
    }
  }
  acc* const out = s + lay.act[0];
  const bool relu = p.relu_after(0);
#pragma unroll
  for (int i = 0; i < kChainRowsPerThread; ++i) {
    const int r = ty + i * kChainGridY;
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const int n = tx + j * kChainGridX;
      if (r >= rows || n >= n0) continue;
      acc v = sum[i][j];
      if (p.bias[0] != nullptr) v += static_cast<acc>(p.bias[0][n]);
      out[r * pitch + n] = relu ? fastmlp::relu(v) : v;
    }
  }
  __syncthreads();
}

// act[l] = act(act[l - 1] . weight[l]^T + bias[l]) for a narrow layer l >= 1.
template <typename scalar_t>
__device__ __forceinline__ void hidden_layer_forward(const FusedChainParams<scalar_t>& p, const ChainSmemLayout& lay,
                                                     acc_t<scalar_t>* s, int l, int rows) {
  using acc = acc_t<scalar_t>;
  const int n_out = p.width[l], n_in = p.width[l - 1];
  const int in_pitch = pitch_of(n_in), out_pitch = pitch_of(n_out);
  const acc* const in = s + lay.act[l - 1];
  acc* const out = s + lay.act[l];
  const scalar_t* const w = p.weight[l];
  const bool relu = p.relu_after(l);
  for (int e = threadIdx.x; e < rows * n_out; e += kChainThreads) {
    const int r = e / n_out, n = e % n_out;
    acc v = acc(0);
    for (int k = 0; k < n_in; ++k) v += in[r * in_pitch + k] * static_cast<acc>(w[n * n_in + k]);
    if (p.bias[l] != nullptr) v += static_cast<acc>(p.bias[l][n]);
    out[r * out_pitch + n] = relu ? fastmlp::relu(v) : v;
  }
  __syncthreads();
}

// The rows from r0 (a tile, fewer at the end of the batch) through every
// layer, activations into shared memory; returns the tile's row count.
template <int kFirstWidth, typename scalar_t>
__device__ __forceinline__ int tile_forward(const FusedChainParams<scalar_t>& p, const ChainSmemLayout& lay,
                                            acc_t<scalar_t>* s, int64_t r0) {
  const int rows = static_cast<int>(p.batch - r0 < p.tile_rows ? p.batch - r0 : p.tile_rows);
  first_layer_forward<kFirstWidth>(p, lay, s, r0, rows);
  for (int l = 1; l < p.layers; ++l) hidden_layer_forward(p, lay, s, l, rows);
  return rows;
}

// The tile's loss terms (returned: this thread's sum) and the logits gradient
// (into g), masked by the last ReLU if there is one.
template <typename scalar_t>
__device__ __forceinline__ acc_t<scalar_t> loss_and_logits_grad(const FusedChainParams<scalar_t>& p,
                                                                const ChainSmemLayout& lay, acc_t<scalar_t>* s,
                                                                acc_t<scalar_t>* g, int64_t r0, int rows) {
  using acc = acc_t<scalar_t>;
  const int n_out = p.width[p.layers - 1], pitch = pitch_of(n_out);
  const acc* const out = s + lay.act[p.layers - 1];
  acc sum = acc(0);
  for (int e = threadIdx.x; e < rows * n_out; e += kChainThreads) {
    const int64_t idx = r0 * n_out + e;
    const int at = e / n_out * pitch + e % n_out;
    const auto t = fastmlp::bce_terms<acc>(out[at], static_cast<acc>(p.target[idx]), p.loss_weight.at(idx),
                                           p.pos_weight.at(idx));
    sum += t.loss;
    g[at] = p.last_relu && !fastmlp::relu_passes(out[at]) ? acc(0) : t.grad_input * p.scale;
  }
  __syncthreads();
  return sum;
}

// Layer l >= 1 backward: its weight / bias gradients into the accumulators and,
// unless l is the lowest layer visited, the gradient of act[l - 1] into g_next.
template <typename scalar_t>
__device__ __forceinline__ void hidden_layer_backward(const FusedChainParams<scalar_t>& p, const ChainSmemLayout& lay,
                                                      acc_t<scalar_t>* s, acc_t<scalar_t>* grads, int l,
                                                      const acc_t<scalar_t>* g, acc_t<scalar_t>* g_next, int rows) {
  using acc = acc_t<scalar_t>;
  const int n_out = p.width[l], n_in = p.width[l - 1];
  const int g_pitch = pitch_of(n_out), in_pitch = pitch_of(n_in);
  const acc* const in = s + lay.act[l - 1];
  if (p.grad_weight[l] != nullptr) {
    acc* const gw = grads + p.grad_offset[l];
    for (int e = threadIdx.x; e < n_out * n_in; e += kChainThreads) {
      const int n = e / n_in, k = e % n_in;
      acc v = acc(0);
      for (int r = 0; r < rows; ++r) v += g[r * g_pitch + n] * in[r * in_pitch + k];
      gw[e] += v;
    }
  }
  if (p.grad_bias[l] != nullptr) {
    acc* const gb = grads + p.bias_offset[l];
    for (int n = threadIdx.x; n < n_out; n += kChainThreads) {
      acc v = acc(0);
      for (int r = 0; r < rows; ++r) v += g[r * g_pitch + n];
      gb[n] += v;
    }
  }
  if (l > p.lowest) {  // act[l - 1] is a hidden layer's output: always ReLU
    const scalar_t* const w = p.weight[l];
    for (int e = threadIdx.x; e < rows * n_in; e += kChainThreads) {
      const int r = e / n_in, k = e % n_in;
      acc v = acc(0);
      for (int n = 0; n < n_out; ++n) v += g[r * g_pitch + n] * static_cast<acc>(w[n * n_in + k]);
      const int at = r * in_pitch + k;
      g_next[at] = fastmlp::relu_passes(in[at]) ? v : acc(0);
    }
  }
  __syncthreads();
}

// Layer 0 backward: bias and weight gradients into the accumulators (the input
// chunks staged again) and the input gradient straight to memory.
template <int kFirstWidth, typename scalar_t>
__device__ __forceinline__ void first_layer_backward(const FusedChainParams<scalar_t>& p, const ChainSmemLayout& lay,
                                                     acc_t<scalar_t>* s, acc_t<scalar_t>* grads,
                                                     const acc_t<scalar_t>* g, int64_t r0, int rows) {
  using acc = acc_t<scalar_t>;
  constexpr int kOwned = kFirstWidth / kChainGroups;
  const int n0 = p.width[0], pitch = pitch_of(n0);
  const int64_t K = p.in_features;
  acc* const gw = grads + p.grad_offset[0];
  if (p.grad_bias[0] != nullptr) {
    acc* const gb = grads + p.bias_offset[0];
    for (int n = threadIdx.x; n < n0; n += kChainThreads) {
      acc v = acc(0);
      for (int r = 0; r < rows; ++r) v += g[r * pitch + n];
      gb[n] += v;
    }
  }
  const bool want_w = p.grad_weight[0] != nullptr, want_x = p.grad_input != nullptr;
  if (!want_w && !want_x) return;
  acc* const xs = s + lay.x_tile;
  acc* const ws = s + lay.w_tile;
  const int k = threadIdx.x % kChainChunk, group = threadIdx.x / kChainChunk;
  // The weight gradient needs the input chunks again, the input gradient the weight's.
  ChunkStage<kFirstWidth, scalar_t> stage;
  stage.load(p, r0, rows, 0, want_w, want_x);
  for (int64_t k0 = 0; k0 < K; k0 += kChainChunk) {
    __syncthreads();  // the buffers' previous contents are consumed
    stage.store(p, xs, ws, want_w, want_x);
    __syncthreads();
    if (k0 + kChainChunk < K) stage.load(p, r0, rows, k0 + kChainChunk, want_w, want_x);
    if (want_w && k0 + k < K) {
      // This thread owns gw[n][k0 + k] for n = group, group + kChainGroups, ...
      acc v[kOwned];
#pragma unroll
      for (int i = 0; i < kOwned; ++i) v[i] = acc(0);
      for (int r = 0; r < rows; ++r) {
        const acc x = xs[r * kXPitch + k];
#pragma unroll
        for (int i = 0; i < kOwned; ++i) {
          const int n = group + i * kChainGroups;
          if (n < n0) v[i] += g[r * pitch + n] * x;
        }
      }
#pragma unroll
      for (int i = 0; i < kOwned; ++i) {
        const int n = group + i * kChainGroups;
        if (n < n0) gw[n * K + k0 + k] += v[i];
      }
    }
    if (want_x) {
      for (int e = threadIdx.x; e < rows * kChainChunk; e += kChainThreads) {
        const int r = e / kChainChunk, kk = e % kChainChunk;
        if (k0 + kk >= K) continue;
        acc v = acc(0);
        for (int n = 0; n < n0; ++n) v += g[r * pitch + n] * ws[kk * pitch + n];
        p.grad_input[(r0 + r) * K + k0 + kk] = static_cast<scalar_t>(v);
      }
    }
  }
}

// One block per grid slot walks the tiles blockIdx.x, blockIdx.x + gridDim.x, ...
// partial: [gridDim.x, grad_offset[layers]] accumulators; loss_partial: [gridDim.x].
template <typename scalar_t, int kFirstWidth>
__global__ void __launch_bounds__(kChainThreads, (chain_blocks_per_sm<scalar_t, kFirstWidth>()))
    fused_step_kernel(FusedChainParams<scalar_t> p, acc_t<scalar_t>* partial, acc_t<scalar_t>* loss_partial) {
  using acc = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc* const s = reinterpret_cast<acc*>(smem);
  const ChainSmemLayout& lay = p.smem;
  const int64_t total_grads = p.grad_offset[p.layers];
  acc* const block_partial = partial + static_cast<int64_t>(blockIdx.x) * total_grads;
  acc* const grads = p.grads_in_smem ? s + lay.grads : block_partial;
  for (int64_t i = threadIdx.x; i < total_grads; i += kChainThreads) grads[i] = acc(0);

  acc loss_sum = acc(0);
  const int64_t tiles = ceil_div(p.batch, static_cast<int64_t>(p.tile_rows));
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t r0 = t * p.tile_rows;
    const int rows = tile_forward<kFirstWidth>(p, lay, s, r0);
    acc* g = s + lay.grad_a;
    acc* g_next = s + lay.grad_b;
    loss_sum += loss_and_logits_grad(p, lay, s, g, r0, rows);
    for (int l = p.layers - 1; l >= p.lowest && l >= 1; --l) {
      hidden_layer_backward(p, lay, s, grads, l, g, g_next, rows);
      acc* const swap = g;
      g = g_next;
      g_next = swap;
    }
    if (p.lowest == 0) first_layer_backward<kFirstWidth>(p, lay, s, grads, g, r0, rows);
  }

  __syncthreads();
  if (p.grads_in_smem) {
    for (int64_t i = threadIdx.x; i < total_grads; i += kChainThreads) block_partial[i] = grads[i];
  }
  const acc block_loss = block_sum(loss_sum, s + lay.scratch);
  if (threadIdx.x == 0) loss_partial[blockIdx.x] = block_loss;
}

// Sums the blocks' partials in block order into the gradients and the loss.
template <typename scalar_t>
__global__ void __launch_bounds__(kChainThreads) fused_step_finish_kernel(FusedChainParams<scalar_t> p,
                                                                          const acc_t<scalar_t>* partial,
                                                                          const acc_t<scalar_t>* loss_partial,
                                                                          int blocks) {
  using acc = acc_t<scalar_t>;
  __shared__ acc scratch[kChainThreads];
  const int64_t total = p.grad_offset[p.layers];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kChainThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kChainThreads + threadIdx.x; i < total; i += stride) {
    int l = 0;
    while (i >= p.grad_offset[l + 1]) ++l;  // only gradients asked for have slots
    scalar_t* const dst =
        i < p.bias_offset[l] ? p.grad_weight[l] + (i - p.grad_offset[l]) : p.grad_bias[l] + (i - p.bias_offset[l]);
    acc v = acc(0);
    for (int b = 0; b < blocks; ++b) v += partial[b * total + i];
    *dst = static_cast<scalar_t>(v);
  }
  if (blockIdx.x == 0) {
    acc v = acc(0);
    for (int b = threadIdx.x; b < blocks; b += kChainThreads) v += loss_partial[b];
    const acc total_loss = block_sum(v, scratch);
    if (threadIdx.x == 0) *p.loss = static_cast<scalar_t>(total_loss * p.scale);
  }
}

// The chain's forward alone (fastmlp::mlp_forward): the same tile walk, every
// layer's activations written out for the backward.
template <typename scalar_t, int kFirstWidth>
__global__ void __launch_bounds__(kChainThreads, (chain_blocks_per_sm<scalar_t, kFirstWidth>()))
    fused_forward_kernel(FusedChainParams<scalar_t> p) {
  using acc = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc* const s = reinterpret_cast<acc*>(smem);
  const ChainSmemLayout& lay = p.smem;
  const int64_t tiles = ceil_div(p.batch, static_cast<int64_t>(p.tile_rows));
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t r0 = t * p.tile_rows;
    const int rows = tile_forward<kFirstWidth>(p, lay, s, r0);
    for (int l = 0; l < p.layers; ++l) {
      const acc* const act = s + lay.act[l];
      const int width = p.width[l], pitch = pitch_of(width);
      scalar_t* const dst = p.activation[l] + r0 * width;
      for (int e = threadIdx.x; e < rows * width; e += kChainThreads) {
        dst[e] = static_cast<scalar_t>(act[e / width * pitch + e % width]);
      }
    }
  }
}

// The most workspace the partials may take (one block's worth at least).
constexpr int64_t kMaxPartialBytes = int64_t(256) << 20;

struct FusedChainPlan {
  int blocks = 0;
  size_t smem_bytes = 0;
};

// The chain shapes the fused kernels take.
template <typename scalar_t> bool fused_chain_qualifies(const FusedChainParams<scalar_t>& p) {
  if (p.layers < 1 || p.layers > kChainMaxLayers || p.batch < 1 || p.in_features < 1) return false;
  for (int l = 0; l < p.layers; ++l) {
    if (p.width[l] < 1 || p.width[l] > kChainMaxWidth) return false;
  }
  return true;
}

// Bytes of the layout the planner set (p.smem).
template <typename scalar_t> size_t chain_smem_bytes(const FusedChainParams<scalar_t>& p) {
  return static_cast<size_t>(p.smem.total) * sizeof(acc_t<scalar_t>);
}

// The largest tile (64, 32 or 16 rows) that still gives the batch as many
// tiles as the SMs, or as 16-row tiles would when the batch is smaller:
// batch 64 runs as 4 tiles of 16, 2048 as 128, 12396 as 194 of 64 on 132 SMs.
inline int chain_tile_rows(int64_t batch, int sm_count) {
  const int64_t wanted = std::min<int64_t>(sm_count, ceil_div(batch, static_cast<int64_t>(kChainMinRows)));
  int rows = kChainMaxRows;
  while (rows > kChainMinRows && ceil_div(batch, static_cast<int64_t>(rows)) < wanted) rows /= 2;
  return rows;
}

// Blocks of `smem_bytes` each that an SM holds at once, at most `by_registers`:
// an SM has 1 KB more shared memory than a block may opt in to, and reserves
// 1 KB per block.
inline int64_t chain_resident_blocks(size_t smem_bytes, size_t smem_optin, int by_registers) {
  const int64_t fit = static_cast<int64_t>((smem_optin + 1024) / (smem_bytes + 1024));
  return std::clamp<int64_t>(fit, 1, by_registers);
}

template <typename scalar_t> int planned_blocks_per_sm(const FusedChainParams<scalar_t>& p) {
  return p.width[0] <= kNarrowFirst ? chain_blocks_per_sm<scalar_t, kNarrowFirst>()
                                    : chain_blocks_per_sm<scalar_t, kChainMaxWidth>();
}

// Sets p.tile_rows and p.smem (the layout for p.forward_only and
// p.grads_in_smem): the planned tile, or a smaller one if its buffers do not
// fit in `smem_optin` bytes. False when not even 16-row buffers fit.
template <typename scalar_t> bool lay_out_chain(FusedChainParams<scalar_t>& p, int rows, size_t smem_optin) {
  for (p.tile_rows = rows; p.tile_rows >= kChainMinRows; p.tile_rows /= 2) {
    p.smem = chain_smem_layout(p);
    if (chain_smem_bytes(p) <= smem_optin) return true;
  }
  return false;
}

// Whether the step kernel takes the chain, and how to launch it on a device
// with `sm_count` SMs and `smem_optin` bytes of shared memory per block; lays
// out the gradient slots (p.grad_offset, p.bias_offset: set the output
// pointers first), the tile and the shared memory (p.tile_rows, p.smem,
// p.grads_in_smem). Grid: every tile its own block, up to what the SMs hold at
// once. The plan depends only on the shapes and the device, so the summation
// order is fixed for a given device.
template <typename scalar_t>
bool plan_fused_step(FusedChainParams<scalar_t>& p, int sm_count, size_t smem_optin, FusedChainPlan* plan) {
  using acc = acc_t<scalar_t>;
  if (!fused_chain_qualifies(p)) return false;
  int64_t offset = 0;
  for (int l = 0; l < p.layers; ++l) {
    p.grad_offset[l] = offset;
    if (p.grad_weight[l] != nullptr) offset += p.width[l] * p.fan_in(l);
    p.bias_offset[l] = offset;
    if (p.grad_bias[l] != nullptr) offset += p.width[l];
  }
  p.grad_offset[p.layers] = offset;
  p.forward_only = false;
  const int rows = chain_tile_rows(p.batch, sm_count);
  p.grads_in_smem = true;
  if (!lay_out_chain(p, rows, smem_optin) || p.tile_rows < rows) {
    // The accumulators go to the block's workspace slice rather than shrink the tile.
    p.grads_in_smem = false;
    if (!lay_out_chain(p, rows, smem_optin)) return false;
  }
  const int64_t tiles = ceil_div(p.batch, static_cast<int64_t>(p.tile_rows));
  const size_t bytes = chain_smem_bytes(p);
  int64_t blocks = std::min(tiles, chain_resident_blocks(bytes, smem_optin, planned_blocks_per_sm(p)) * sm_count);
  // A very wide first layer: bound the workspace of the partials.
  const int64_t slots = offset > 0 ? offset : 1;  // none: the loss alone
  blocks = std::min(blocks, std::max<int64_t>(1, kMaxPartialBytes / (slots * static_cast<int64_t>(sizeof(acc)))));
  plan->blocks = static_cast<int>(blocks);
  plan->smem_bytes = bytes;
  return true;
}

// The forward kernel's launch: no accumulators, so several blocks share an SM.
template <typename scalar_t>
bool plan_fused_forward(FusedChainParams<scalar_t>& p, int sm_count, size_t smem_optin, FusedChainPlan* plan) {
  if (!fused_chain_qualifies(p)) return false;
  p.forward_only = true;
  p.grads_in_smem = false;
  if (!lay_out_chain(p, chain_tile_rows(p.batch, sm_count), smem_optin)) return false;
  const int64_t tiles = ceil_div(p.batch, static_cast<int64_t>(p.tile_rows));
  const int64_t max_blocks = 8 * static_cast<int64_t>(sm_count);
  plan->blocks = static_cast<int>(tiles < max_blocks ? tiles : max_blocks);
  plan->smem_bytes = chain_smem_bytes(p);
  return true;
}

// Multiply-adds of the first layer one block of the planned grid does, at most,
// for the fused kernels to be the heuristic's choice: each block walks its
// tiles' first layer on one SM, so past this a wide first layer on few blocks
// (1000 -> 100 at batch 64: 4 blocks of 1.6M) is slower than the layer path's
// split-K GEMMs on many (~37 against ~9 us by bench/perf_model.py).
constexpr int64_t kFusedMaxBlockMacs = int64_t(1) << 20;

// The heuristic between a planned fused kernel and the layer path (cuBLAS or
// gemm_kernel): fused while the first layer's GEMM is below kCublasMinMacs
// (cuBLAS beats the SIMT tiles above) and no block does more than
// kFusedMaxBlockMacs of it. cuda/fused_or_layered.cuh applies it (or times both).
template <typename scalar_t>
bool fused_chain_preferred(const FusedChainParams<scalar_t>& p, const FusedChainPlan& plan) {
  if (gemm_on_cublas(p.batch, p.width[0], p.in_features, false)) return false;
  const int64_t tiles = ceil_div(p.batch, static_cast<int64_t>(p.tile_rows));
  const int64_t block_rows = std::min(ceil_div(tiles, static_cast<int64_t>(plan.blocks)) * p.tile_rows, p.batch);
  return static_cast<double>(block_rows) * static_cast<double>(p.in_features) * static_cast<double>(p.width[0]) <=
         static_cast<double>(kFusedMaxBlockMacs);
}

template <typename scalar_t>
void launch_fused_forward(const FusedChainParams<scalar_t>& p, const FusedChainPlan& plan, cudaStream_t stream) {
  auto* const kernel = p.width[0] <= kNarrowFirst ? fused_forward_kernel<scalar_t, kNarrowFirst>
                                                  : fused_forward_kernel<scalar_t, kChainMaxWidth>;
  if (plan.smem_bytes > kDefaultDynamicSmem) allow_dynamic_smem(kernel, plan.smem_bytes);
  launch_kernel(kernel, dim3(plan.blocks), dim3(kChainThreads), plan.smem_bytes, stream, p);
}

// Accumulator elements of workspace the launch needs.
template <typename scalar_t> int64_t fused_step_workspace_elems(const FusedChainParams<scalar_t>& p, int blocks) {
  return static_cast<int64_t>(blocks) * (p.grad_offset[p.layers] + 1);
}

template <typename scalar_t>
void launch_fused_step(const FusedChainParams<scalar_t>& p, const FusedChainPlan& plan, acc_t<scalar_t>* workspace,
                       cudaStream_t stream) {
  auto* const kernel = p.width[0] <= kNarrowFirst ? fused_step_kernel<scalar_t, kNarrowFirst>
                                                  : fused_step_kernel<scalar_t, kChainMaxWidth>;
  if (plan.smem_bytes > kDefaultDynamicSmem) allow_dynamic_smem(kernel, plan.smem_bytes);
  acc_t<scalar_t>* const loss_partial = workspace + static_cast<int64_t>(plan.blocks) * p.grad_offset[p.layers];
  launch_kernel(kernel, dim3(plan.blocks), dim3(kChainThreads), plan.smem_bytes, stream, p,
                workspace, loss_partial);
  // At least one block (block 0 also sums the loss), at most 1024 (grid-stride).
  const int64_t finish_blocks = std::clamp<int64_t>(ceil_div(p.grad_offset[p.layers], kChainThreads), 1, 1024);
  launch_kernel(fused_step_finish_kernel<scalar_t>, dim3(static_cast<unsigned>(finish_blocks)), dim3(kChainThreads), 0,
                stream, p, static_cast<const acc_t<scalar_t>*>(workspace),
                static_cast<const acc_t<scalar_t>*>(loss_partial), plan.blocks);
}

}  // namespace fastmlp::cuda
