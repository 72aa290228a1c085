"""segformer_fast.core.numerics: the TF32 scope of the fp32 ground truth."""

import threading

import pytest
import torch

from segformer_fast.core.numerics import no_tf32


def tf32_flags():
    return torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()


@pytest.fixture
def tf32_on():
    """The flags as PyTorch's defaults for cuDNN plus TF32 matmuls on ("high"); the test's starting flags restored."""
    saved = tf32_flags()
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    yield
    torch.backends.cudnn.allow_tf32, precision = saved
    torch.set_float32_matmul_precision(precision)


def test_no_tf32_turns_tf32_off_and_restores_the_callers_flags(tf32_on):
    torch.set_float32_matmul_precision("medium")  # a non-default setting must come back exactly
    with no_tf32():
        assert tf32_flags() == (False, "highest")
        assert not torch.backends.cuda.matmul.allow_tf32
        with no_tf32():  # nested: still off, and the inner exit does not restore early
            assert tf32_flags() == (False, "highest")
        assert tf32_flags() == (False, "highest")
    assert tf32_flags() == (True, "medium")


def test_no_tf32_restores_flags_after_an_exception(tf32_on):
    with pytest.raises(ValueError, match="boom"):
        with no_tf32():
            assert tf32_flags() == (False, "highest")
            raise ValueError("boom")
    assert tf32_flags() == (True, "high")


def test_no_tf32_overlapping_threads_restore_the_flags_once_all_have_left(tf32_on):
    inside, leave_first = threading.Event(), threading.Event()
    seen = []

    def first():
        with no_tf32():
            inside.set()
            leave_first.wait(10)
        seen.append(tf32_flags())

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(10)
    with no_tf32():
        leave_first.set()
        thread.join(10)
        seen.append(tf32_flags())  # the first thread left: the flags stay off while this scope is open
    assert seen == [(False, "highest"), (False, "highest")]
    assert tf32_flags() == (True, "high")


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="the fp32_precision API exists from torch 2.9")
def test_no_tf32_with_flags_set_through_the_new_api():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        conv.fp32_precision = "tf32"
        with no_tf32():
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
