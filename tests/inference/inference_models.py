"""What the inference tests share: the random B0's class count, its forward without autograd, mmseg's whole mode
written out, and the bytes of live tensors during a forward."""

import dataclasses
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

NUM_LABELS = 7


def no_grad_forward(model):
    def forward(pixel_values):
        with torch.no_grad():
            return model(pixel_values)

    return forward


def upsampled_logits(forward, pixel_values):
    """mmseg's whole mode written out: one forward, logits upsampled (bilinear) to the input size in float32."""
    logits = forward(pixel_values)
    return F.interpolate(logits.float(), size=pixel_values.shape[2:], mode="bilinear", align_corners=False)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active and still referenced: a CPU stand-in for
    torch.cuda.max_memory_allocated (storages in ``exclude``, the weights and the input, are not counted)."""

    def __init__(self, exclude=()):
        super().__init__()
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.refs, self.sizes, self.current, self.peak = {}, {}, 0, 0

    def _release(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.current -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if not storage.nbytes() or storage.data_ptr() in self.exclude:
                continue
            if key not in self.refs:
                self.refs[key], self.sizes[key] = 0, storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            self.refs[key] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def engine_tensors(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif dataclasses.is_dataclass(obj):
        for field in dataclasses.fields(obj):
            engine_tensors(getattr(obj, field.name), out)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            engine_tensors(item, out)
    return out
