"""Op families: each file holds the pure-PyTorch reference, the autograd Function that wraps the
Triton launchers of ``mmfuse.kernels``, and the functional entry point."""
