"""The PyTorch runners of the model benchmark (bench_model.py registers them): the engine, the eager reference,
transformers eager and ``torch.compile`` of the reference in a given mode.

A runner's callable may carry, besides ``notes`` (copied into every row, read after the row ran):

- ``tf32``: False where the runner itself runs fp32 as IEEE fp32 whatever torch's flags say (the engine);
- ``precision``: what runs where it is not the row's dtype (the int8 runners of ``runtimes``: "int8 (NNCF
  PTQ)" in an fp32 row); it becomes the row's ``precision``;
- ``row_facts(pixel_values) -> dict``: facts read after a row's timed calls and stored in the row (the engine:
  whether the shape's CUDA graph was really captured).
"""

import torch

from segformer_fast.core.runtime import is_out_of_memory
from segformer_fast.engine.engine import optimize
from segformer_fast.model.segformer import Segformer

from .harness import RunnerUnavailable, one_line


def _reference_model(variant, num_labels, device, dtype):
    return Segformer.from_config(variant, num_labels=num_labels, seed=0).to(device=device, dtype=dtype)


def reference_runner(variant, num_labels, device, dtype):
    """The eager reference model (segformer_fast.model.Segformer)."""
    return _reference_model(variant, num_labels, device, dtype)


def transformers_runner(variant, num_labels, device, dtype):
    """transformers' SegformerForSemanticSegmentation, eager, with the reference's weights."""
    try:
        import transformers
    except ImportError as err:
        raise RunnerUnavailable(f"transformers is not importable ({err})") from None
    hf_model = _reference_model(variant, num_labels, torch.device("cpu"), torch.float32).to_transformers()
    hf_model = hf_model.to(device=device, dtype=dtype).eval()

    def run(pixel_values):
        return hf_model(pixel_values=pixel_values).logits

    run.notes = f"transformers {transformers.__version__} eager"
    return run


def compile_runner(mode):
    """A factory of torch.compile runners of the reference in ``mode`` (None: the default mode), static shapes."""

    def factory(variant, num_labels, device, dtype):
        import torch._dynamo

        # Dynamo's caches are per code object and shared by every Segformer instance: without a reset the
        # recompile limit is reached after a few settings and later rows would silently run eager.
        torch._dynamo.reset()
        try:
            compiled = torch.compile(_reference_model(variant, num_labels, device, dtype), mode=mode, dynamic=False)
        except Exception as err:  # noqa: BLE001 - any failure of the compiler means "not available here"
            raise RunnerUnavailable(f"torch.compile failed on {device.type}: {one_line(err)}") from err

        def run(pixel_values):
            try:
                return compiled(pixel_values)
            except Exception as err:  # noqa: BLE001 - compilation happens on the first call of each shape
                if is_out_of_memory(err):
                    raise
                raise RunnerUnavailable(f"torch.compile failed on {device.type}: {one_line(err)}") from err

        run.notes = f"torch.compile(mode={mode or 'default'}, dynamic=False)"
        return run

    return factory


def engine_runner(variant, num_labels, device, dtype):
    """segformer_fast.optimize() of the reference: fused kernels, folded decoder, CUDA graphs on CUDA."""
    engine = optimize(_reference_model(variant, num_labels, device, torch.float32), dtype=dtype)

    def run(pixel_values):
        return engine(pixel_values)

    def row_facts(pixel_values):
        if not engine.use_cuda_graphs:
            return {"cuda_graph": None}
        return {"cuda_graph": engine.graph_cache.captured(pixel_values)}

    run.engine = engine
    run.tf32 = False  # an fp32 engine runs with TF32 off (segformer_fast.core.numerics.no_tf32)
    run.row_facts = row_facts
    run.notes = f"engine ({engine.kernels} kernels{', CUDA graphs' if engine.use_cuda_graphs else ''})"
    return run
