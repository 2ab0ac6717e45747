"""Triton kernels and their launchers: tensors in, tensors out, no autograd.

Installed as ``mmfuse.kernels`` (never as a top-level ``kernels``: that name belongs to Hugging Face's
package). Import it only through ``mmfuse``: the dispatch module reads ``TRITON_INTERPRET`` first.
"""
