"""glibc malloc thresholds for CPU inference (segformer_fast.core.malloc_tuning): the switch's environment words."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("value, tuned", [("0", False), ("false", False), ("No", False), ("off", False),
                                          ("1", True), ("", True)])
def test_tune_malloc_accepts_the_usual_false_words(value, tuned):
    code = ("import segformer_fast.core.malloc_tuning as m; m._glibc_mallopt = lambda: (lambda *a: 1); "
            "print(m.keep_freed_memory())")
    env = dict(os.environ, SEGFORMER_FAST_TUNE_MALLOC=value)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(tuned)
