"""The fused attention kernels match an fp64 reference at least as well as torch does in the same precision."""

# TRITON_INTERPRET must be set before the kernels are imported: Triton decides between compiler
# and interpreter when a kernel is decorated, and the kernels pick their one-config autotune
# list and bf16 dot workaround at import. It is set here rather than in a tests/conftest.py
# so that only sessions collecting these modules run in the interpreter. It cannot be put back
# after the import: Triton consults it again when it first launches a kernel.
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from megapixel_kernels import attention as fused  # noqa: E402


def assert_as_accurate_as_torch(
    name: str, got: torch.Tensor, low: torch.Tensor, exact: torch.Tensor, ulps: float = 1.0
) -> None:
    """FlashAttention's criterion: the kernel's max error against fp64 is at most twice torch's own."""
    kernel_err = (got.double() - exact).abs().max().item()
    torch_err = (low.double() - exact).abs().max().item()
    # Plus `ulps` units in the last place at the tensor's scale (eps * max|exact|; ~1e-3 for fp16
    # values near one): where both errors are a few roundings, or zero (seq length 1 has
    # dq = dk = 0), their ratio is luck rather than a bug, which would cost orders of magnitude
    # more. bf16 needs no extra room: under the interpreter the kernels round their bf16
    # conversions to nearest even themselves, as a GPU does, instead of truncating (NOTES.md).
    floor = ulps * torch.finfo(got.dtype).eps * max(exact.abs().max().item(), 1.0)
    assert kernel_err <= 2 * torch_err + floor, (
        f"{name}: kernel error {kernel_err:.3g} > 2 x torch error {torch_err:.3g} + {floor:.3g}"
    )


def output_and_grads(fn, q, k, v, do, **kwargs) -> list[torch.Tensor]:
    """Attention output and (dq, dk, dv) for the upstream gradient do."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v, **kwargs)
    return [o.detach(), *torch.autograd.grad(o, (q, k, v), do)]


def check_against_references(q, k, v, do, ulps: float = 1.0, **kwargs) -> None:
    """Output and gradients of the kernel against fp64, with torch in q's precision as the yardstick."""
    got = output_and_grads(fused.attention, q, k, v, do, **kwargs)
    low = output_and_grads(fused.reference_attention, q, k, v, do, **kwargs)
    exact = output_and_grads(fused.reference_attention, *(t.double() for t in (q, k, v, do)), **kwargs)
    for name, g, lo, ex in zip(("out", "dq", "dk", "dv"), got, low, exact, strict=True):
        assert g.shape == ex.shape and g.dtype == q.dtype, name
        assert_as_accurate_as_torch(name, g, lo, ex, ulps)


def test_kernels_run_in_the_interpreter():
    assert fused.INTERPRET, "megapixel_kernels.attention was imported before TRITON_INTERPRET=1 was set in this process"


# Each head dim meets every sequence length once and both masks in both dtypes, without the
# full cross-product: the interpreter costs ~3 ms per program instance, and a ragged 257 is the
# dearest. 96 is the padded (non power of two) head dim; 1 and 17 live inside one block.
SLOW = pytest.mark.slow
CASES = [
    pytest.param(64, True, 257, torch.float16, marks=SLOW),
    (64, True, 17, torch.bfloat16),
    (64, False, 1, torch.float16),
    (64, False, 128, torch.bfloat16),
    (96, True, 17, torch.float16),
    (96, True, 128, torch.bfloat16),
    pytest.param(96, False, 257, torch.float16, marks=SLOW),
    (96, False, 1, torch.bfloat16),
    (128, True, 128, torch.float16),
    (128, True, 1, torch.bfloat16),
    (128, False, 17, torch.float16),
    pytest.param(128, False, 257, torch.bfloat16, marks=SLOW),
]


@pytest.mark.parametrize("head_dim, causal, seq_len, dtype", CASES)
def test_attention_and_its_gradients_are_as_accurate_as_torch(head_dim, causal, seq_len, dtype):
    q, k, v, do = (torch.randn(2, 2, seq_len, head_dim, dtype=dtype) for _ in range(4))
    check_against_references(q, k, v, do, causal=causal)


def test_strided_inputs_and_explicit_scale():
    # The model hands over (batch, seq, heads, dim) activations transposed, not copied.
    q, k, v, do = (torch.randn(1, 40, 3, 64, dtype=torch.float16).transpose(1, 2) for _ in range(4))
    check_against_references(q, k, v, do, causal=True, scale=0.3)


def test_fp32_inputs_are_accepted():
    q, k, v, do = (torch.randn(1, 2, 33, 64) for _ in range(4))
    # In fp32 torch is as precise as the kernel (both accumulate in fp32, in different orders), so
    # twice its error is no bound: over 1400 draws the kernel's error reached ~9 ulps at the tensor's
    # scale while torch's was sometimes 2. With eight ulps the worst of 800 draws used 58% of the
    # bound, and a real bug would still exceed it by orders of magnitude.
    check_against_references(q, k, v, do, ulps=8.0, causal=False)


@pytest.mark.parametrize(
    "shapes",
    [
        ((1, 1, 8, 256),) * 3,  # head dim beyond the kernels' tiles
        ((1, 1, 8, 64), (1, 1, 9, 64), (1, 1, 8, 64)),  # keys of another length
    ],
)
def test_unsupported_shapes_are_refused(shapes):
    q, k, v = (torch.randn(s, dtype=torch.float16) for s in shapes)
    with pytest.raises(ValueError):
        fused.attention(q, k, v)
