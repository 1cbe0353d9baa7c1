"""Lowering a Triton kernel to Hopper (sm_90) code on a machine without a GPU (Triton's bundled ptxas)."""

from __future__ import annotations


def compile_for_hopper(kernel, types: dict[str, str], constexprs: dict) -> bytes:
    """The sm_90 cubin of ``kernel``: arguments typed as ``types`` says (``*fp32``, ``fp32``, ...),
    ``constexprs`` bound, every other argument an i32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: types.get(name, "constexpr" if name in constexprs else "i32") for name in kernel.arg_names}
    return triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32)).asm["cubin"]
