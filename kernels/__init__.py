"""Fused Triton kernels (attention, norms), each beside the plain-torch reference it is tested against."""
