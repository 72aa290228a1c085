"""Shared setup of the kernel tests.

Without CUDA the kernels run on CPU tensors in the Triton interpreter: ``TRITON_INTERPRET=1`` is set here, before
``segformer_fast.kernels`` (and so ``triton``'s ``@jit``) is imported by any test module. Full-size stage-1 shapes
are marked ``@pytest.mark.cuda`` and skipped without a GPU (the interpreter would take hours on them).

``record_launches`` + ``compile_for_sm90`` let a CPU-only run prove that every kernel configuration the
launchers pick also compiles for an H100/H200 (sm_90): the launches are recorded (not executed) in the
interpreter, then compiled by the real Triton compiler in a subprocess (no GPU needed to compile). Each compiled
kernel's PTX also goes through ptxas -v (Triton's own ptxas) for its register spills: a spill fails the test for
fp16/bf16 kernels and is reported (a warning listing each kernel and its bytes) for fp32 ones.
"""

import json
import os
import signal
import subprocess
import sys
import warnings
import zlib

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: full-size shapes that only run on a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(
        reason="full-size stage-1 shape: needs a CUDA GPU (the Triton CPU interpreter is far too slow for it)"
    )
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device():
    """'cuda' when a GPU is present, else 'cpu' (kernels then run in the Triton interpreter)."""
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(scope="session")
def other_device(device):
    """A device the launchers must reject."""
    return "meta" if device == "cpu" else "cpu"


@pytest.fixture(params=DTYPES, ids=DTYPE_IDS)
def dtype(request):
    return request.param


@pytest.fixture
def randn(request, device):
    """``randn(*shape, scale=1, shift=0, dtype=fp64)``: Normal(shift, scale) values drawn in fp64 on the CPU from a
    generator seeded by the test id (fresh per test, reproducible), then cast and moved to ``device``."""
    gen = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))

    def make(*shape, scale=1.0, shift=0.0, dtype=torch.float64):
        values = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift
        return values.to(device=device, dtype=dtype)

    return make


def _specialize(value):
    """(type, key) of a kernel argument as the installed Triton's JIT specializes it (Triton's own function)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    if isinstance(value, torch.Tensor) and value.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unexpected tensor dtype {value.dtype}")
    return native_specialize_impl(BaseBackend, value, False, True, True)


def _recorder(launches):
    """A replacement for ``InterpretedFunction.run`` that appends each launch to ``launches`` instead of running it."""

    def record(self, *args, grid, warmup, **kwargs):
        import inspect

        import triton.language as tl

        params = inspect.signature(self.fn).parameters
        values = dict(zip(params, args))
        values.update({k: v for k, v in kwargs.items() if k in params})
        signature, constexprs, divisible = {}, {}, []
        for index, (name, param) in enumerate(params.items()):
            value = values[name]
            if param.annotation is tl.constexpr:
                signature[name] = "constexpr"
                # UPCAST is the interpreter's bf16 workaround; on a GPU it is always False
                constexprs[name] = False if name == "UPCAST" else value
                continue
            # as the JIT specializes a launch: integers equal to 1 become constants, integers divisible by 16 and
            # 16-byte aligned pointers are marked divisible, floats and bools are not specialized
            kind, key = _specialize(value)
            signature[name] = kind
            if kind == "constexpr":
                constexprs[name] = key
            elif key == "D":
                divisible.append(index)
        launches.append({
            "module": self.fn.__module__, "name": self.fn.__name__, "signature": signature, "constexprs": constexprs,
            "divisible": divisible, "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3),
            "grid": tuple(grid) if isinstance(grid, (tuple, list)) else (grid,),
        })

    return record


@pytest.fixture
def record_launches(monkeypatch):
    """Record interpreter launches instead of running them: a list of dicts (module, name, signature, ...)."""
    if HAS_CUDA:
        pytest.skip("launch recording uses the Triton interpreter (CPU-only runs)")
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    monkeypatch.setattr(InterpretedFunction, "run", _recorder(launches))
    return launches


@pytest.fixture(scope="session")
def launch_recorder():
    """``with launch_recorder() as launches:``: record_launches for wider scopes (a context manager)."""
    if HAS_CUDA:
        pytest.skip("launch recording uses the Triton interpreter (CPU-only runs)")
    import contextlib

    from triton.runtime.interpreter import InterpretedFunction

    @contextlib.contextmanager
    def recording():
        launches = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(InterpretedFunction, "run", _recorder(launches))
            yield launches

    return recording


_COMPILE_SCRIPT = r"""
import concurrent.futures, importlib, json, os, re, subprocess, sys, tempfile

def ptxas_path():
    from triton.backends.nvidia import compiler
    try:
        return compiler.get_ptxas(90).path  # Triton >= 3.7 picks ptxas per architecture
    except TypeError:
        return compiler.get_ptxas().path

def spills(ptx):
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        proc = subprocess.run([ptxas_path(), "-v", "--gpu-name=sm_90a", source, "-o", source + ".o"],
                              capture_output=True, text=True, check=True)
    report = proc.stdout + proc.stderr
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report).groups())
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    return {"spill_stores": stores, "spill_loads": loads, "registers": registers}

def build(spec):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    attrs = {(i,): [["tt.divisibility", 16]] for i in spec["divisible"]}
    kernel = compile(ASTSource(fn, spec["signature"], spec["constexprs"], attrs), target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    return {"name": spec["name"], "shared": kernel.metadata.shared, **spills(kernel.asm["ptx"])}

if __name__ == "__main__":
    import triton
    print("triton", triton.__version__, file=sys.stderr)
    expected = os.environ.get("EXPECT_TRITON_VERSION")
    if expected and not triton.__version__.startswith(expected):
        sys.exit(f"expected triton {expected}, imported {triton.__version__} from {triton.__file__}")
    specs = json.load(sys.stdin)
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(len(specs), os.cpu_count() or 1)) as pool:
        print(json.dumps(list(pool.map(build, specs))))
"""

#: Shared memory a block may use on sm_90 (227 KiB).
SM90_MAX_SHARED = 227 * 1024


@pytest.fixture
def compile_for_sm90(tmp_path):
    """``compile_for_sm90(launches)``: the checker below (a fixture so test modules need not import conftest)."""
    return lambda launches, **options: _compile_for_sm90(launches, tmp_path, **options)


def _launch_dtype(spec) -> str:
    """The activation dtype of a recorded launch: fp16 / bf16 when any pointer has it, else fp32."""
    pointers = {kind[1:] for kind in spec["signature"].values() if kind.startswith("*")}
    return next((name for name in ("fp16", "bf16") if name in pointers), "fp32")


def _describe(spec) -> str:
    constexprs = {k: v for k, v in spec["constexprs"].items() if k != "UPCAST"}
    return f"{spec['name']} {_launch_dtype(spec)} {constexprs} num_warps={spec['num_warps']}"


def _compile_for_sm90(launches, tmp_dir, fp32_spills_fail=False, triton_path=None, expect_version=None):
    """Compile each recorded launch for sm_90 in a subprocess without the interpreter; check shared memory and
    spills (none allowed in fp16/bf16; fp32 spills fail with ``fp32_spills_fail``, else are reported as a
    warning). ``triton_path``: a folder holding another Triton (``pip install --target``) to compile with, checked
    to be version ``expect_version``.
    Returns the per-launch results."""
    launches = [{k: v for k, v in spec.items() if k != "grid"} for spec in launches]  # the grid is not compiled
    unique = {json.dumps(spec, sort_keys=True): spec for spec in launches}
    assert unique, "no kernel launch was recorded"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if triton_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(triton_path), env.get("PYTHONPATH")]))
    if expect_version:
        env["EXPECT_TRITON_VERSION"] = expect_version
    script = tmp_dir / "compile_sm90.py"
    script.write_text(_COMPILE_SCRIPT)
    # its own process group, so that a timeout ends the compile workers too, not only their parent
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(json.dumps(list(unique.values())), timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"sm_90 compile of {len(unique)} launches took over 900 s")
    if proc.returncode:
        pytest.fail(f"sm_90 compile failed:\n{stderr[-4000:]}")
    results = json.loads(stdout.strip().splitlines()[-1])
    fp32_spills, low_precision_spills = [], []
    for spec, result in zip(unique.values(), results):
        assert result["shared"] <= SM90_MAX_SHARED, (
            f"{_describe(spec)}: {result['shared']} bytes of shared memory, sm_90 allows {SM90_MAX_SHARED}"
        )
        spilled = f"{_describe(spec)}: {result['spill_stores']} bytes spill stores / {result['spill_loads']} loads " \
                  f"per thread ({result['registers']} registers)"
        if result["spill_stores"] or result["spill_loads"]:
            (fp32_spills if _launch_dtype(spec) == "fp32" else low_precision_spills).append(spilled)
    assert not low_precision_spills, "fp16/bf16 kernels spill registers on sm_90:\n" + "\n".join(low_precision_spills)
    assert not (fp32_spills_fail and fp32_spills), "fp32 kernels spill registers on sm_90:\n" + "\n".join(fp32_spills)
    if fp32_spills:
        warnings.warn("fp32 kernels spill registers on sm_90:\n" + "\n".join(fp32_spills), stacklevel=2)
    return results
