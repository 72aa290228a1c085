// CUDA fused decode: logits = ReLU(P1 + sum_{i=2..4} up_i(P_i) + bias) W_cls^T + b_cls.
//
// One block computes a tile of consecutive pixels of the stage-1 grid of one image:
//  1. the hidden tile (pixels x D) is built in shared memory straight from the channels-last maps (bilinear taps
//     per pixel precomputed once per tile), with bias and ReLU; it never goes to global memory;
//  2. the classifier multiplies it by W_cls: for fp16/bf16 on tensor cores (WMMA m16n16k16, fp32 accumulators,
//     64 x 64 label tiles, W_cls streamed through shared memory in 64-channel slabs), for fp32 on CUDA cores;
//  3. the bias is added and logits are written NCHW with consecutive threads on consecutive pixels.

#include <mma.h>

#include "../cuda_kernels.h"
#include "common.cuh"

namespace segformer_fast {
namespace cuda {
namespace {

constexpr int THREADS = 256;
constexpr int TC_PIXELS = 64;
constexpr int TC_LABELS = 64;
constexpr int TC_SLAB = 64;
constexpr int TC_PAD = 8;
constexpr int TC_C_LD = TC_PIXELS + 4;
constexpr int SIMT_PIXELS = 32;
constexpr int SIMT_LD = SIMT_PIXELS + 1;
constexpr int SIMT_LABELS_PER_THREAD = 4;

// Passed to the kernels as a __grid_constant__ parameter: indexed with a runtime stage, a plain by-value struct
// would be copied to local memory (96 bytes of stack per thread on sm_90); this way it is read in place.
struct Maps {
  const void* data[4];
  int height[4];
  int width[4];
  float scale_h[4];
  float scale_w[4];
};

// Bilinear taps of one pixel into one of stages 2..4: pixel offsets (row * w + col) and weights.
struct PixelTaps {
  int offset[4];
  float weight[4];
};

// Fills taps[p * 3 + s - 1] for the tile's pixels, then calls store(p, d, hidden) for every pixel p < tile and
// channel d < dim_padded (0 past the image or past dim). Ends with a barrier.
template <typename T, typename Store>
__device__ void build_hidden(const Maps& maps, const T* __restrict__ bias, int64_t batch_index, int64_t pixel0,
                             int tile, int dim, int dim_padded, PixelTaps* taps, Store store) {
  const int64_t out_w = maps.width[0];
  const int64_t pixels = static_cast<int64_t>(maps.height[0]) * out_w;
  for (int i = threadIdx.x; i < tile * 3; i += blockDim.x) {
    const int p = i / 3;
    const int s = i % 3 + 1;
    int64_t pixel = pixel0 + p;
    pixel = pixel < pixels ? pixel : pixels - 1;
    const Taps ty = linear_taps(maps.scale_h[s], static_cast<int>(pixel / out_w), maps.height[s]);
    const Taps tx = linear_taps(maps.scale_w[s], static_cast<int>(pixel % out_w), maps.width[s]);
    const int w = maps.width[s];
    PixelTaps t;
    t.offset[0] = ty.i0 * w + tx.i0;
    t.offset[1] = ty.i0 * w + tx.i1;
    t.offset[2] = ty.i1 * w + tx.i0;
    t.offset[3] = ty.i1 * w + tx.i1;
    t.weight[0] = ty.lambda0 * tx.lambda0;
    t.weight[1] = ty.lambda0 * tx.lambda1;
    t.weight[2] = ty.lambda1 * tx.lambda0;
    t.weight[3] = ty.lambda1 * tx.lambda1;
    taps[i] = t;
  }
  __syncthreads();
  const T* stage1 = static_cast<const T*>(maps.data[0]) + (batch_index * pixels + pixel0) * dim;
  for (int p = 0; p < tile; ++p) {
    const bool valid = pixel0 + p < pixels;
    for (int d = threadIdx.x; d < dim_padded; d += blockDim.x) {
      float v = 0.0f;
      if (valid && d < dim) {
        v = to_float(bias[d]) + to_float(stage1[static_cast<int64_t>(p) * dim + d]);
#pragma unroll
        for (int s = 1; s < 4; ++s) {
          const PixelTaps& t = taps[p * 3 + s - 1];
          const T* image = static_cast<const T*>(maps.data[s]) +
                           batch_index * static_cast<int64_t>(maps.height[s]) * maps.width[s] * dim + d;
          v += t.weight[0] * to_float(image[static_cast<int64_t>(t.offset[0]) * dim]) +
               t.weight[1] * to_float(image[static_cast<int64_t>(t.offset[1]) * dim]) +
               t.weight[2] * to_float(image[static_cast<int64_t>(t.offset[2]) * dim]) +
               t.weight[3] * to_float(image[static_cast<int64_t>(t.offset[3]) * dim]);
        }
        v = (v > 0.0f || isnan(v)) ? v : 0.0f;  // NaN propagates, as torch.relu
      }
      store(p, d, v);
    }
  }
  __syncthreads();
}

struct TensorCoreLayout {
  int dim_padded;
  int ld_hidden;
  size_t hidden_bytes, weight_bytes, acc_bytes, taps_bytes;
  __host__ __device__ size_t total() const { return hidden_bytes + weight_bytes + acc_bytes + taps_bytes; }
};

template <typename T>
__host__ __device__ TensorCoreLayout tensor_core_layout(int dim) {
  TensorCoreLayout l;
  l.dim_padded = (dim + TC_SLAB - 1) / TC_SLAB * TC_SLAB;
  l.ld_hidden = l.dim_padded + TC_PAD;
  l.hidden_bytes = sizeof(T) * TC_PIXELS * l.ld_hidden;
  l.weight_bytes = sizeof(T) * TC_LABELS * (TC_SLAB + TC_PAD);
  l.acc_bytes = sizeof(float) * TC_LABELS * TC_C_LD;
  l.taps_bytes = sizeof(PixelTaps) * TC_PIXELS * 3;
  return l;
}

// fp16 / bf16: hidden tile (64 pixels x D) in shared memory, classifier on tensor cores. 8 warps: warp w owns
// pixel rows 16 * (w % 4) and label columns 32 * (w / 4) of each 64 x 64 output tile.
template <typename T>
__global__ void __launch_bounds__(THREADS)
    fused_decode_tensor_core_kernel(const __grid_constant__ Maps maps, const T* __restrict__ bias,
                                    const T* __restrict__ cls_weight, const T* __restrict__ cls_bias,
                                    T* __restrict__ logits, int dim, int num_labels) {
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem[];
  const TensorCoreLayout layout = tensor_core_layout<T>(dim);
  T* hidden = reinterpret_cast<T*>(smem);
  T* weight = reinterpret_cast<T*>(smem + layout.hidden_bytes);
  float* acc_tile = reinterpret_cast<float*>(smem + layout.hidden_bytes + layout.weight_bytes);
  PixelTaps* taps = reinterpret_cast<PixelTaps*>(smem + layout.hidden_bytes + layout.weight_bytes + layout.acc_bytes);

  const int64_t batch_index = blockIdx.y;
  const int64_t pixel0 = static_cast<int64_t>(blockIdx.x) * TC_PIXELS;
  const int64_t pixels = static_cast<int64_t>(maps.height[0]) * maps.width[0];
  const int ld = layout.ld_hidden;
  build_hidden<T>(maps, bias, batch_index, pixel0, TC_PIXELS, dim, layout.dim_padded, taps,
                  [&](int p, int d, float v) { hidden[p * ld + d] = from_float<T>(v); });

  const int warp = threadIdx.x / 32;
  const int m_tile = warp % 4;
  const int n_pair = warp / 4;
  for (int n0 = 0; n0 < num_labels; n0 += TC_LABELS) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);
    for (int d0 = 0; d0 < layout.dim_padded; d0 += TC_SLAB) {
      for (int i = threadIdx.x; i < TC_LABELS * TC_SLAB; i += THREADS) {
        const int n = i / TC_SLAB;
        const int k = i % TC_SLAB;
        const int label = n0 + n;
        const int d = d0 + k;
        weight[n * (TC_SLAB + TC_PAD) + k] = (label < num_labels && d < dim)
                                                 ? cls_weight[static_cast<int64_t>(label) * dim + d]
                                                 : from_float<T>(0.0f);
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < TC_SLAB; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, hidden + m_tile * 16 * ld + d0 + k, ld);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, weight + (n_pair * 2 + j) * 16 * (TC_SLAB + TC_PAD) + k, TC_SLAB + TC_PAD);
          wmma::mma_sync(acc[j], a, b, acc[j]);
        }
      }
      __syncthreads();
    }
    // acc_tile[label][pixel] (column-major store) so the write-out reads consecutive pixels conflict-free.
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(acc_tile + (n_pair * 2 + j) * 16 * TC_C_LD + m_tile * 16, acc[j], TC_C_LD,
                              wmma::mem_col_major);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < TC_LABELS * TC_PIXELS; i += THREADS) {
      const int n = i / TC_PIXELS;
      const int m = i % TC_PIXELS;
      const int label = n0 + n;
      const int64_t pixel = pixel0 + m;
      if (label < num_labels && pixel < pixels) {
        logits[(batch_index * num_labels + label) * pixels + pixel] =
            from_float<T>(acc_tile[n * TC_C_LD + m] + to_float(cls_bias[label]));
      }
    }
    __syncthreads();
  }
}

size_t simt_shared_bytes(int dim) { return sizeof(float) * dim * SIMT_LD + sizeof(PixelTaps) * SIMT_PIXELS * 3; }

// fp32: hidden tile stored [d][pixel] (padded), lane = pixel, each warp runs 4 labels at a time; W_cls reads are
// warp-uniform (broadcast through the cache).
__global__ void __launch_bounds__(THREADS)
    fused_decode_simt_kernel(const __grid_constant__ Maps maps, const float* __restrict__ bias,
                             const float* __restrict__ cls_weight, const float* __restrict__ cls_bias,
                             float* __restrict__ logits, int dim, int num_labels) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* hidden = reinterpret_cast<float*>(smem);
  PixelTaps* taps = reinterpret_cast<PixelTaps*>(smem + sizeof(float) * dim * SIMT_LD);
  const int64_t batch_index = blockIdx.y;
  const int64_t pixel0 = static_cast<int64_t>(blockIdx.x) * SIMT_PIXELS;
  const int64_t pixels = static_cast<int64_t>(maps.height[0]) * maps.width[0];
  build_hidden<float>(maps, bias, batch_index, pixel0, SIMT_PIXELS, dim, dim, taps,
                      [&](int p, int d, float v) { hidden[d * SIMT_LD + p] = v; });
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t pixel = pixel0 + lane;
  for (int k0 = warp * SIMT_LABELS_PER_THREAD; k0 < num_labels; k0 += (THREADS / 32) * SIMT_LABELS_PER_THREAD) {
    float acc[SIMT_LABELS_PER_THREAD] = {};
    const float* rows[SIMT_LABELS_PER_THREAD];
#pragma unroll
    for (int j = 0; j < SIMT_LABELS_PER_THREAD; ++j) {
      const int label = min(k0 + j, num_labels - 1);
      rows[j] = cls_weight + static_cast<int64_t>(label) * dim;
    }
    for (int d = 0; d < dim; ++d) {
      const float h = hidden[d * SIMT_LD + lane];
#pragma unroll
      for (int j = 0; j < SIMT_LABELS_PER_THREAD; ++j) {
        acc[j] += h * __ldg(rows[j] + d);
      }
    }
    if (pixel < pixels) {
#pragma unroll
      for (int j = 0; j < SIMT_LABELS_PER_THREAD; ++j) {
        if (k0 + j < num_labels) {
          logits[(batch_index * num_labels + k0 + j) * pixels + pixel] = acc[j] + cls_bias[k0 + j];
        }
      }
    }
  }
}

template <typename Kernel>
cudaError_t prepare_shared(Kernel kernel, size_t bytes) {
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  int limit = 0;
  status = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status != cudaSuccess) return status;
  if (bytes > static_cast<size_t>(limit)) return cudaErrorInvalidValue;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T>
cudaError_t launch_tensor_core(const FusedDecodeArgs& args, const Maps& maps, dim3 grid, cudaStream_t stream) {
  const size_t bytes = tensor_core_layout<T>(static_cast<int>(args.dim)).total();
  cudaError_t status = prepare_shared(fused_decode_tensor_core_kernel<T>, bytes);
  if (status != cudaSuccess) return status;
  fused_decode_tensor_core_kernel<T><<<grid, THREADS, bytes, stream>>>(
      maps, static_cast<const T*>(args.bias), static_cast<const T*>(args.cls_weight),
      static_cast<const T*>(args.cls_bias), static_cast<T*>(args.logits), static_cast<int>(args.dim),
      static_cast<int>(args.num_labels));
  return cudaGetLastError();
}

}  // namespace

cudaError_t fused_decode(const FusedDecodeArgs& args, cudaStream_t stream) {
  Maps maps;
  for (int s = 0; s < 4; ++s) {
    maps.data[s] = args.maps[s];
    maps.height[s] = static_cast<int>(args.heights[s]);
    maps.width[s] = static_cast<int>(args.widths[s]);
    maps.scale_h[s] = static_cast<float>(args.heights[s]) / static_cast<float>(args.heights[0]);
    maps.scale_w[s] = static_cast<float>(args.widths[s]) / static_cast<float>(args.widths[0]);
  }
  const int64_t pixels = args.heights[0] * args.widths[0];
  if (args.batch == 0 || pixels == 0) return cudaSuccess;
  if (args.dtype == DType::kFloat32) {
    const dim3 grid(static_cast<unsigned>((pixels + SIMT_PIXELS - 1) / SIMT_PIXELS), static_cast<unsigned>(args.batch));
    const size_t bytes = simt_shared_bytes(static_cast<int>(args.dim));
    cudaError_t status = prepare_shared(fused_decode_simt_kernel, bytes);
    if (status != cudaSuccess) return status;
    fused_decode_simt_kernel<<<grid, THREADS, bytes, stream>>>(
        maps, static_cast<const float*>(args.bias), static_cast<const float*>(args.cls_weight),
        static_cast<const float*>(args.cls_bias), static_cast<float*>(args.logits), static_cast<int>(args.dim),
        static_cast<int>(args.num_labels));
    return cudaGetLastError();
  }
  const dim3 grid(static_cast<unsigned>((pixels + TC_PIXELS - 1) / TC_PIXELS), static_cast<unsigned>(args.batch));
  if (args.dtype == DType::kFloat16) return launch_tensor_core<__half>(args, maps, grid, stream);
  return launch_tensor_core<__nv_bfloat16>(args, maps, grid, stream);
}

}  // namespace cuda
}  // namespace segformer_fast
