import importlib.util
import os
import sys
from pathlib import Path

import torch

# Test helpers (tiny HF model builders) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent / "models"))

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The switch is read
# when kernels are decorated, so it must be set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fix_triton_interpreter() -> None:
    """Work around three bugs of the triton 3.6 interpreter (the compiled GPU path is unaffected).

    * numpy >= 2.4 refuses ``int()`` of a 1-element array, which the interpreter uses for loop
      bounds held in tensors (triton-lang/triton#9171, fixed after 3.6).
    * ``tl.dot`` multiplies the uint16 bit patterns of bfloat16 operands
      (triton-lang/triton#11584): widen them to float32 first, which is exact, as the GPU's
      bf16 MMA multiplies exactly and accumulates in fp32.
    * An integer cast to bfloat16 stores the integer itself as the uint16 bit pattern (numpy's
      astype into the interpreter's bf16 storage): convert through float32, as the GPU's
      conversion does (exact for int8 codes).
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if not getattr(patch_tensor, "_strata_fix", False):
        def patched(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
        patched._strata_fix = True
        interpreter._patch_lang_tensor = patched

    builder = interpreter.InterpreterBuilder
    create_dot = builder.create_dot
    if not getattr(create_dot, "_strata_fix", False):
        def widen(h):
            if h.dtype != tl.bfloat16:
                return h
            return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32),
                                            tl.float32)

        def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)
        dot._strata_fix = True
        builder.create_dot = dot

    cast = builder.cast_impl
    if not getattr(cast, "_strata_fix", False):
        def int_to_bf16(self, src, dst_type):
            if dst_type.scalar == tl.bfloat16 and src.dtype.scalar.is_int():
                src = interpreter.TensorHandle(src.data.astype(np.float32), tl.float32)
            return cast(self, src, dst_type)
        int_to_bf16._strata_fix = True
        builder.cast_impl = int_to_bf16


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    _fix_triton_interpreter()
