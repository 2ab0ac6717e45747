"""The ``mmfuse`` command: ``mmfuse verify`` (every kernel against its reference) and ``mmfuse report``
(exact figures without a GPU)."""

from __future__ import annotations

import argparse
import os
import sys


def _ensure_interpreter_on_cpu(argv) -> None:
    """Without a GPU the kernels can only run interpreted, and Triton reads TRITON_INTERPRET when the
    kernels are decorated, so set it and re-execute before anything imports them."""
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("MMFUSE_CLI_REEXEC") == "1":
        return
    import torch

    if torch.cuda.is_available():
        return
    env = dict(os.environ, TRITON_INTERPRET="1", MMFUSE_CLI_REEXEC="1")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.execve(sys.executable, [sys.executable, "-m", "mmfuse.cli", *argv], env)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (no warning)
    parser = argparse.ArgumentParser(prog="mmfuse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_verify = sub.add_parser("verify", help="run every kernel against its PyTorch reference")
    p_verify.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p_verify.add_argument("--op", nargs="*", default=None,
                          help="only these op families (e.g. linear mlp); default: all")
    p_report = sub.add_parser("report", help="exact figures without a GPU: compiled configs, grids, waves")
    p_report.add_argument("--out", default=None, help="write the markdown here instead of stdout")
    args = parser.parse_args(argv)

    if args.command == "verify":
        if args.device != "cuda":
            _ensure_interpreter_on_cpu(argv)
        from mmfuse import verify

        return verify.main(args.device, args.op)
    if args.command == "report":
        from mmfuse import report

        return report.main(args.out)
    return 2


if __name__ == "__main__":
    sys.exit(main())
