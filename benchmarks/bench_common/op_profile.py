"""The CPU profile's view of torch.profiler events (``profile_cpu.py``): each op's category, its FLOP and byte floors,
a forward's time summed by category, and the top ops."""

from __future__ import annotations

TOP_OPS = 15

CATEGORIES = ("gemm", "attention softmax", "sdpa", "attention kernel", "patch-embed conv", "depthwise conv", "gelu",
              "layer_norm", "decoder", "copy", "other")
#: The ops that name a category; a convolution op names "patch-embed conv" or "depthwise conv" by its weight.
CATEGORY_OF_OP = {
    "mkldnn::_linear_pointwise": "gemm", "aten::addmm": "gemm", "aten::mm": "gemm", "aten::bmm": "gemm",
    "aten::linear": "gemm", "aten::matmul": "gemm",
    "aten::softmax": "attention softmax", "aten::_softmax": "attention softmax",
    "aten::scaled_dot_product_attention": "sdpa", "aten::_scaled_dot_product_flash_attention_for_cpu": "sdpa",
    "aten::gelu": "gelu",
    "aten::layer_norm": "layer_norm", "aten::native_layer_norm": "layer_norm",
    "segformer_fast::layer_norm": "layer_norm",
    "segformer_fast::fused_decode": "decoder", "segformer_fast::fused_decode_tokens": "decoder",
    "segformer_fast::kv_attention": "attention kernel",
    "aten::copy_": "copy", "aten::clone": "copy",
}
#: The convolution ops (aten::conv2d down to the implementations); each takes (input, weight, ...) first.
CONV_OPS = ("aten::conv2d", "aten::convolution", "aten::_convolution", "aten::mkldnn_convolution",
            "aten::thnn_conv2d", "aten::_slow_conv2d_forward", "aten::_nnpack_spatial_convolution",
            "mkldnn::_convolution_pointwise")
#: The GEMM ops whose FLOPs are counted (an enclosing aten::linear / aten::matmul calls one of these).
GEMM_OPS = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::bmm")
#: Bytes per element of the dtype names the profiler records.
ITEMSIZE = {"double": 8, "float": 4, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4, "short int": 2,
            "signed char": 1, "unsigned char": 1, "bool": 1}


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def conv_category(event) -> str:
    """"depthwise conv" when the conv's weight (C_out, C_in / groups, k, k) has one input channel per group and as
    many output channels as the input has channels, else "patch-embed conv"."""
    input_shape, weight_shape = event.input_shapes[0], event.input_shapes[1]
    depthwise = len(weight_shape) == 4 and weight_shape[1] == 1 and weight_shape[0] == input_shape[1] > 1
    return "depthwise conv" if depthwise else "patch-embed conv"


def category_of(event) -> str:
    """The category of an event's self time: that of the nearest op naming one, the event itself or an enclosing
    op; "other" when there is none."""
    node = event
    while node is not None:
        if node.name in CONV_OPS:
            return conv_category(node)
        if node.name in CATEGORY_OF_OP:
            return CATEGORY_OF_OP[node.name]
        node = node.cpu_parent
    return "other"


def _under_gemm(event) -> bool:
    node = event.cpu_parent
    while node is not None:
        if node.name in GEMM_OPS:
            return True
        node = node.cpu_parent
    return False


def _conv_output_elements(event) -> int:
    """Output elements of an ``aten::convolution(input, weight, bias, stride, padding, dilation, ...)`` or a
    ``mkldnn::_convolution_pointwise(input, weight, bias, padding, stride, dilation, ...)`` event."""
    input_shape, weight_shape = event.input_shapes[0], event.input_shapes[1]
    if event.name == "mkldnn::_convolution_pointwise":
        padding, stride, dilation = event.concrete_inputs[3:6]
    else:
        stride, padding, dilation = event.concrete_inputs[3:6]
    spatial = [
        (size + 2 * pad - dil * (kernel - 1) - 1) // step + 1
        for size, kernel, step, pad, dil in zip(input_shape[2:], weight_shape[2:], stride, padding, dilation)
    ]
    return input_shape[0] * weight_shape[0] * _numel(spatial)


def _bytes(event, index: int) -> int | None:
    """Bytes of the event's input ``index`` (None when its dtype is not one we know)."""
    itemsize = ITEMSIZE.get(event.input_dtypes[index])
    return None if itemsize is None else _numel(event.input_shapes[index]) * itemsize


def floors(event) -> tuple:
    """(FLOPs, bytes) floors of one event, each None where the event counts none (see the module docstring)."""
    name, shapes = event.name, event.input_shapes
    if name in GEMM_OPS and not _under_gemm(event):
        if name == "mkldnn::_linear_pointwise":
            # (x, weight, bias, attr, scalars, algorithm), or the .binary overload (x, other, weight, bias, attr)
            x, weight = shapes[0], shapes[1] if len(shapes) == 6 else shapes[2]
            return 2 * _numel(x[:-1]) * x[-1] * weight[0], None
        a, b = (shapes[1], shapes[2]) if name == "aten::addmm" else (shapes[0], shapes[1])
        return 2 * _numel(a) * b[-1], None  # a (..., M, K), b (..., K, N)
    if name in ("aten::convolution", "mkldnn::_convolution_pointwise"):  # the depthwise conv's GELU is not counted
        weight = shapes[1]
        return 2 * _conv_output_elements(event) * _numel(weight[1:]), None
    if name == "aten::_scaled_dot_product_flash_attention_for_cpu":
        q, k = shapes[0], shapes[1]  # (B, heads, N, d), (B, heads, Nkv, d)
        return 4 * _numel(q) * k[2], None
    if name in ("aten::native_layer_norm", "segformer_fast::layer_norm", "aten::gelu", "aten::_softmax"):
        read = _bytes(event, 0)
        return None, None if read is None else 2 * read
    if name == "aten::copy_":
        written, read = _bytes(event, 0), _bytes(event, 1)
        return None, None if written is None or read is None else written + read
    if name == "segformer_fast::kv_attention":
        q, kv = shapes[0], shapes[1]  # (B, N, C), (B, Nkv, 2C): q kᵀ and the product with v, over all heads
        return 4 * _numel(q) * kv[1], None
    if name == "segformer_fast::fused_decode":
        maps = [_bytes(event, i) for i in range(4)]
        (batch, height, width, _), num_labels = shapes[0], shapes[5][0]
        itemsize = ITEMSIZE.get(event.input_dtypes[0])
        if itemsize is None or None in maps:
            return None, None
        return None, sum(maps) + batch * num_labels * height * width * itemsize
    if name == "segformer_fast::fused_decode_tokens":
        # (t1, w1, p2, p3, p4, bias, cls_weight, cls_bias): the stage-1 tokens, the three maps, the logits
        inputs = [_bytes(event, i) for i in (0, 2, 3, 4)]
        (batch, height, width, _), num_labels = shapes[0], shapes[6][0]
        itemsize = ITEMSIZE.get(event.input_dtypes[0])
        if itemsize is None or None in inputs:
            return None, None
        return None, sum(inputs) + batch * num_labels * height * width * itemsize
    return None, None


def summarize(events, forwards: int) -> dict:
    """{category: {ms, flops, bytes, gflops_per_s, gb_per_s}} per forward from the events of ``forwards`` calls."""
    totals = {name: {"us": 0.0, "flops": None, "bytes": None} for name in CATEGORIES}
    for event in events:
        category = category_of(event)
        total = totals[category]
        total["us"] += event.self_cpu_time_total
        for key, value in zip(("flops", "bytes"), floors(event)):
            if value is not None:
                total[key] = (total[key] or 0) + value
    summary = {}
    for name, total in totals.items():
        ms = total["us"] / 1e3 / forwards
        flops = None if total["flops"] is None else total["flops"] // forwards
        moved = None if total["bytes"] is None else total["bytes"] // forwards
        summary[name] = {
            "ms": ms,
            "flops": flops,
            "bytes": moved,
            "gflops_per_s": flops / (ms * 1e6) if flops is not None and ms > 0 else None,
            "gb_per_s": moved / (ms * 1e6) if moved is not None and ms > 0 else None,
        }
    return summary


def top_ops(profiler, forwards: int, count: int = TOP_OPS) -> list:
    """The ``count`` ops (grouped by name and input shapes) of most self CPU time, per forward."""
    averages = sorted(profiler.key_averages(group_by_input_shape=True), key=lambda a: a.self_cpu_time_total,
                      reverse=True)
    return [
        {"name": average.key, "input_shapes": average.input_shapes,
         "ms": average.self_cpu_time_total / 1e3 / forwards, "calls": average.count / forwards}
        for average in averages[:count]
    ]
