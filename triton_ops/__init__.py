"""Triton kernels for sgdc_conv (installed as sgdc_kernels.triton_ops)."""
