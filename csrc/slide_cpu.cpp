// CPU implementation of segformer_fast::slide_argmax: the label pass of sliding-window inference (mmseg's slide
// mode) for a band of output rows, in one pass over the windows that cover it.
//
// Definition (ops/reference.py, slide_argmax): each window's logits (B, K, h_i, w_i) are resized bilinearly
// (align_corners=False) to up_size_i and their top-left (y2 - y1) x (x2 - x1) part is added at the window's place
// in a (B, K, height, width) sum; the sum is divided by the number of windows covering each pixel; that average is
// resized bilinearly to the labels' (out_height, out_width) (not at all when the sizes are equal) and arg-maxed over
// K (first index on ties, NaN the maximum). Windows are added in the order given, as mmseg adds them.
//
// Here the full-resolution logits never exist: per task (an image and a block of kBlockRows output rows) and per
// class, the window rows the block needs are resized from each window's 1/4-resolution logits (horizontal pass once
// per source row, vertical blend per output row), summed, divided and, if the sizes differ, resized again, then
// folded into a running argmax. Every step is PyTorch's CPU fp32 bilinear arithmetic (bilinear.h), so the labels
// equal the definition's bit for bit where F.interpolate runs its generic kernel (output H + W > 128).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "bilinear.h"
#include "cpu_dispatch.h"

namespace segformer_fast {
namespace slide_base {
#include "slide_cpu_kernels.h"
}  // namespace slide_base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SEGFORMER_FAST_SLIDE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace slide_avx2 {
#include "slide_cpu_kernels.h"
}  // namespace slide_avx2
#pragma GCC pop_options
#endif

namespace {

// Output rows per task: enough to share each window's horizontal passes over ~4 output rows (logits at 1/4), few
// enough that a task's sums stay in L2.
constexpr int64_t kBlockRows = 16;

struct SlideKernels {
  decltype(&slide_base::horizontal_row) horizontal_row;
  decltype(&slide_base::accumulate_blend) accumulate_blend;
  decltype(&slide_base::blend_row) blend_row;
  decltype(&slide_base::divide_row) divide_row;
  decltype(&slide_base::argmax_update) argmax_update;
};

SlideKernels select_slide_kernels() {
#ifdef SEGFORMER_FAST_SLIDE_AVX2
  static const bool avx2 =
      !cpu_baseline_forced() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) {
    return {&slide_avx2::horizontal_row, &slide_avx2::accumulate_blend, &slide_avx2::blend_row,
            &slide_avx2::divide_row, &slide_avx2::argmax_update};
  }
#endif
  return {&slide_base::horizontal_row, &slide_base::accumulate_blend, &slide_base::blend_row,
          &slide_base::divide_row, &slide_base::argmax_update};
}

// A bilinear axis with 32-bit indices (the columns, read by gathers).
struct ColumnAxis {
  std::vector<int32_t> index0, index1;
  std::vector<float> lambda0, lambda1;
};

ColumnAxis column_axis(int64_t input_size, int64_t output_size, int64_t used) {
  const LinearAxis axis = linear_axis<float>(input_size, output_size);
  ColumnAxis out;
  out.index0.assign(axis.index0.begin(), axis.index0.begin() + used);
  out.index1.assign(axis.index1.begin(), axis.index1.begin() + used);
  out.lambda0.assign(axis.lambda0.begin(), axis.lambda0.begin() + used);
  out.lambda1.assign(axis.lambda1.begin(), axis.lambda1.begin() + used);
  return out;
}

struct Window {
  const float* data;  // (B, K, h, w) contiguous
  int64_t h, w, y1, y2, x1, x2;
  LinearAxis rows;   // window row (0 .. y2 - y1) -> source rows of the logits
  ColumnAxis cols;   // window column (0 .. x2 - x1) -> source columns
};

// One window's part in a task: the task's slide rows it covers (slot j, window row yy) and the source rows read.
struct Touch {
  const Window* window;
  std::vector<std::pair<int64_t, int64_t>> rows;
  int64_t first_source, last_source;
};

std::vector<Window> make_windows(const std::vector<at::Tensor>& logits, c10::IntArrayRef boxes,
                                 c10::IntArrayRef up_sizes, int64_t height, int64_t width) {
  TORCH_CHECK(!logits.empty(), "slide_argmax: needs at least one window, got none");
  const int64_t count = static_cast<int64_t>(logits.size());
  TORCH_CHECK(static_cast<int64_t>(boxes.size()) == 4 * count && static_cast<int64_t>(up_sizes.size()) == 2 * count,
              "slide_argmax: expected 4 box values (y1, y2, x1, x2) and 2 upsampled sizes per window for ", count,
              " windows, got ", boxes.size(), " and ", up_sizes.size());
  const at::Tensor& first = logits.front();
  std::vector<Window> windows;
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& t = logits[i];
    TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(),
                "slide_argmax: window ", i, " logits must be a contiguous float32 (B, K, h, w) CPU tensor, got ",
                t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
    TORCH_CHECK(t.size(0) == first.size(0) && t.size(1) == first.size(1) && t.size(1) > 0 && t.size(2) > 0 &&
                    t.size(3) > 0,
                "slide_argmax: window ", i, " logits ", t.sizes(), " must have the batch and classes of window 0 ",
                first.sizes(), " and h, w >= 1");
    const int64_t y1 = boxes[4 * i], y2 = boxes[4 * i + 1], x1 = boxes[4 * i + 2], x2 = boxes[4 * i + 3];
    const int64_t up_h = up_sizes[2 * i], up_w = up_sizes[2 * i + 1];
    TORCH_CHECK(0 <= y1 && y1 < y2 && y2 <= height && 0 <= x1 && x1 < x2 && x2 <= width,
                "slide_argmax: window ", i, " (y1, y2, x1, x2) = (", y1, ", ", y2, ", ", x1, ", ", x2,
                ") must lie inside the ", height, "x", width, " image");
    TORCH_CHECK(up_h >= y2 - y1 && up_w >= x2 - x1, "slide_argmax: window ", i, " upsampled size ", up_h, "x", up_w,
                " must be at least its ", y2 - y1, "x", x2 - x1, " extent");
    LinearAxis rows = linear_axis<float>(t.size(2), up_h);
    windows.push_back(Window{t.data_ptr<float>(), t.size(2), t.size(3), y1, y2, x1, x2, std::move(rows),
                             column_axis(t.size(3), up_w, x2 - x1)});
  }
  return windows;
}

// Every pixel of the slide rows [first, last] must be covered by a window (else its average is 0 / 0).
void check_coverage(const std::vector<Window>& windows, int64_t first, int64_t last, int64_t width) {
  for (int64_t y = first; y <= last; ++y) {
    std::vector<std::pair<int64_t, int64_t>> spans;
    for (const Window& w : windows) {
      if (w.y1 <= y && y < w.y2) {
        spans.emplace_back(w.x1, w.x2);
      }
    }
    std::sort(spans.begin(), spans.end());
    int64_t covered = 0;
    for (const auto& [x1, x2] : spans) {
      if (x1 > covered) {
        break;
      }
      covered = std::max(covered, x2);
    }
    TORCH_CHECK(covered >= width, "slide_argmax: pixel (", y, ", ", covered,
                ") of the slide grid is covered by no window given");
  }
}

struct Problem {
  std::vector<Window> windows;
  int64_t batch, num_labels, height, width, out_height, out_width;
  bool resized;
  LinearAxis out_rows;
  ColumnAxis out_cols;
};

// The labels of output rows [row_begin, row_end) of image b, written to `labels` (out_height, out_width).
void label_rows(const Problem& p, const SlideKernels& k, int64_t b, int64_t row_begin, int64_t row_end,
                int64_t* labels) {
  const int64_t width = p.width, out_width = p.out_width, rows = row_end - row_begin;
  std::vector<int64_t> slide_rows;  // the slide rows the block reads, ascending
  for (int64_t r = row_begin; r < row_end; ++r) {
    slide_rows.push_back(p.resized ? p.out_rows.index0[r] : r);
    if (p.resized) {
      slide_rows.push_back(p.out_rows.index1[r]);
    }
  }
  std::sort(slide_rows.begin(), slide_rows.end());
  slide_rows.erase(std::unique(slide_rows.begin(), slide_rows.end()), slide_rows.end());
  const int64_t n = static_cast<int64_t>(slide_rows.size());
  const int64_t base_row = slide_rows.front();
  std::vector<int64_t> slot(slide_rows.back() - base_row + 1, -1);
  for (int64_t j = 0; j < n; ++j) {
    slot[slide_rows[j] - base_row] = j;
  }
  std::vector<Touch> touches;
  int64_t scratch_rows = 0;
  std::vector<float> count(n * width, 0.0f);
  for (const Window& w : p.windows) {
    Touch touch{&w, {}, INT64_MAX, -1};
    for (int64_t j = 0; j < n; ++j) {
      if (w.y1 <= slide_rows[j] && slide_rows[j] < w.y2) {
        const int64_t yy = slide_rows[j] - w.y1;
        touch.rows.emplace_back(j, yy);
        touch.first_source = std::min(touch.first_source, w.rows.index0[yy]);
        touch.last_source = std::max(touch.last_source, w.rows.index1[yy]);
      }
    }
    if (!touch.rows.empty()) {
      scratch_rows = std::max(scratch_rows, (touch.last_source - touch.first_source + 1) * (w.x2 - w.x1));
      touches.push_back(std::move(touch));
    }
  }
  for (const Touch& touch : touches) {  // the window count per pixel, in fp32 as mmseg's count_mat (exact)
    for (const auto& [j, yy] : touch.rows) {
      float* c = count.data() + j * width;
      for (int64_t x = touch.window->x1; x < touch.window->x2; ++x) {
        c[x] += 1.0f;
      }
    }
  }
  std::vector<float> sums(n * width), resized_rows(p.resized ? n * out_width : 0), values(out_width);
  std::vector<float> passes(scratch_rows), best(rows * out_width);
  std::vector<int32_t> best_index(rows * out_width);
  for (int64_t label = 0; label < p.num_labels; ++label) {
    std::fill(sums.begin(), sums.end(), 0.0f);
    for (const Touch& touch : touches) {
      const Window& w = *touch.window;
      const int64_t span = w.x2 - w.x1;
      const float* image = w.data + ((b * p.num_labels + label) * w.h) * w.w;
      for (int64_t s = touch.first_source; s <= touch.last_source; ++s) {
        k.horizontal_row(image + s * w.w, w.cols.index0.data(), w.cols.index1.data(), w.cols.lambda0.data(),
                         w.cols.lambda1.data(), span, passes.data() + (s - touch.first_source) * span);
      }
      for (const auto& [j, yy] : touch.rows) {
        const float* top = passes.data() + (w.rows.index0[yy] - touch.first_source) * span;
        const float* bottom = passes.data() + (w.rows.index1[yy] - touch.first_source) * span;
        k.accumulate_blend(top, bottom, w.rows.lambda0[yy], w.rows.lambda1[yy], span,
                           sums.data() + j * width + w.x1);
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      k.divide_row(count.data() + j * width, width, sums.data() + j * width);
      if (p.resized) {
        k.horizontal_row(sums.data() + j * width, p.out_cols.index0.data(), p.out_cols.index1.data(),
                         p.out_cols.lambda0.data(), p.out_cols.lambda1.data(), out_width,
                         resized_rows.data() + j * out_width);
      }
    }
    for (int64_t r = row_begin; r < row_end; ++r) {
      const float* row = p.resized ? nullptr : sums.data() + slot[r - base_row] * width;
      if (p.resized) {
        const float* top = resized_rows.data() + slot[p.out_rows.index0[r] - base_row] * out_width;
        const float* bottom = resized_rows.data() + slot[p.out_rows.index1[r] - base_row] * out_width;
        k.blend_row(top, bottom, p.out_rows.lambda0[r], p.out_rows.lambda1[r], out_width, values.data());
        row = values.data();
      }
      k.argmax_update(row, static_cast<int32_t>(label), out_width, best.data() + (r - row_begin) * out_width,
                      best_index.data() + (r - row_begin) * out_width);
    }
  }
  for (int64_t i = 0; i < rows * out_width; ++i) {
    labels[row_begin * out_width + i] = best_index[i];
  }
}

void slide_argmax_cpu(const std::vector<at::Tensor>& window_logits, c10::IntArrayRef boxes,
                      c10::IntArrayRef up_sizes, int64_t height, int64_t width, const at::Tensor& labels,
                      int64_t row_begin, int64_t row_end) {
  TORCH_CHECK(height > 0 && width > 0, "slide_argmax: the slide size must be positive, got ", height, "x", width);
  Problem p{make_windows(window_logits, boxes, up_sizes, height, width), 0, 0, height, width, 0, 0, false, {}, {}};
  p.batch = window_logits.front().size(0);
  p.num_labels = window_logits.front().size(1);
  TORCH_CHECK(labels.dim() == 3 && labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.device().is_cpu() && labels.size(0) == p.batch && labels.size(1) > 0 && labels.size(2) > 0,
              "slide_argmax: labels must be a contiguous int64 (B=", p.batch, ", H, W) CPU tensor, got ",
              labels.scalar_type(), " of shape ", labels.sizes(), " on ", labels.device());
  p.out_height = labels.size(1);
  p.out_width = labels.size(2);
  TORCH_CHECK(0 <= row_begin && row_begin <= row_end && row_end <= p.out_height, "slide_argmax: rows [", row_begin,
              ", ", row_end, ") must lie within the ", p.out_height, " rows of the labels");
  if (row_begin == row_end || p.batch == 0) {
    return;
  }
  p.resized = p.out_height != height || p.out_width != width;
  if (p.resized) {
    p.out_rows = linear_axis<float>(height, p.out_height);
    p.out_cols = column_axis(width, p.out_width, p.out_width);
  }
  const int64_t first = p.resized ? p.out_rows.index0[row_begin] : row_begin;
  const int64_t last = p.resized ? p.out_rows.index1[row_end - 1] : row_end - 1;
  check_coverage(p.windows, first, last, width);
  const SlideKernels kernels = select_slide_kernels();
  const int64_t blocks = (row_end - row_begin + kBlockRows - 1) / kBlockRows;
  int64_t* out = labels.data_ptr<int64_t>();
  at::parallel_for(0, p.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks;
      const int64_t r0 = row_begin + (task % blocks) * kBlockRows;
      label_rows(p, kernels, b, r0, std::min(r0 + kBlockRows, row_end), out + b * p.out_height * p.out_width);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(segformer_fast, CPU, m) {
  m.impl("slide_argmax", &slide_argmax_cpu);
}

}  // namespace segformer_fast
