"""The ``mmfuse`` command: ``mmfuse verify`` (every kernel against its reference), ``mmfuse bench``
(timings on a GPU), ``mmfuse gpu-check`` (a few minutes on a GPU: verify, CUDA value tests, quick bench),
``mmfuse report`` (exact figures without a GPU) and ``mmfuse models`` (what ``mmfuse.patch`` covers)."""

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
    p_verify.add_argument("--shard", default=None, metavar="I/N",
                          help="only every N-th check from the I-th (0-based): N processes share the compiles")
    p_bench = sub.add_parser("bench", help="time every op against every baseline on this GPU (report without one)")
    p_bench.add_argument("--out-dir", default=os.path.join("bench", "results"), help="where results are written")
    p_bench.add_argument("--op", nargs="*", default=None, help="only these ops (mlp gated_mlp merged_mlp patch_embed cross_attention)")
    p_bench.add_argument("--shape", nargs="*", default=None, help="only these shapes (names in bench/shapes.py)")
    p_bench.add_argument("--impl", nargs="*", default=None,
                         help="only these implementations (mmfuse eager 'torch.compile' ...); mmfuse is always run")
    p_bench.add_argument("--dtype", nargs="*", default=None, help="only these dtypes (bfloat16 float16)")
    p_bench.add_argument("--profile", default="full", choices=("full", "quick"),
                         help="full: every case (a long GPU run); quick: two shapes per op, bf16, the cheap "
                              "baselines (what gpu-check runs)")
    p_bench.add_argument("--readme", default=None,
                         help="then rewrite this README's results section from the latest results file")
    p_check = sub.add_parser("gpu-check", help="a few minutes on a GPU: verify, the value tests on CUDA, "
                                               "the quick benchmark (at most 8 minutes)")
    p_check.add_argument("--out-dir", default=os.path.join("bench", "results"), help="where results are written")
    p_check.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together")
    p_check.add_argument("--steps", nargs="*", default=None, help="only these steps (verify tests bench profile)")
    p_check.add_argument("--archive", default=None,
                         help="after every step, pack the out-dir into this .tar.gz (one file to bring back)")
    p_models = sub.add_parser("models", help="the model registry: every family, class and recipe mmfuse.patch covers")
    p_models.add_argument("--declined", action="store_true",
                          help="list the recognised classes left alone, with the reason, instead")
    p_models.add_argument("--readme", default=None, help="rewrite this README's supported-models block")
    p_report = sub.add_parser("report", help="exact figures without a GPU: compiled configs, grids, waves")
    p_report.add_argument("--out", default=None, help="write the markdown here instead of stdout")
    args = parser.parse_args(argv)

    if args.command == "verify":
        if args.device != "cuda":
            _ensure_interpreter_on_cpu(argv)
        from mmfuse import verify

        return verify.main(args.device, args.op, shard=_shard(args.shard))
    if args.command == "bench":
        rc = _bench(args.out_dir, args.op, profile=args.profile, shapes=args.shape, impls=args.impl,
                    dtypes=args.dtype)
        if args.readme:
            from mmfuse.bench import readme

            readme.rewrite(args.readme, args.out_dir)
            print(f"mmfuse bench: results section of {args.readme} regenerated")
        return rc
    if args.command == "gpu-check":
        from mmfuse import gpu_check

        return gpu_check.main(args.out_dir, budget_s=args.budget, steps=args.steps, archive=args.archive)
    if args.command == "models":
        from mmfuse import registry

        if args.readme:
            registry.rewrite_readme(args.readme)
            print(f"mmfuse models: supported-models block of {args.readme} regenerated")
            return 0
        print(registry.declined_table() if args.declined else registry.models_table())
        return 0
    if args.command == "report":
        from mmfuse import report

        return report.main(args.out)
    return 2


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise SystemExit(f"mmfuse verify: --shard: expected I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise SystemExit(f"mmfuse verify: --shard: expected 0 <= I < N, got {text!r}")
    return i, n


def _bench(out_dir: str, ops=None, timer=None, cuda=None, profile: str = "full", shapes=None, impls=None,
           dtypes=None) -> int:
    import datetime

    import torch

    from mmfuse import report
    from mmfuse.bench import suite

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        path = os.path.join(out_dir, f"no-gpu-{datetime.date.today().isoformat()}-report.md")
        os.makedirs(out_dir, exist_ok=True)
        print("mmfuse bench: no CUDA GPU on this machine, so nothing can be timed. Writing the exact "
              "figures that need no GPU (compiled configs, grids, waves, bytes) instead.")
        return report.main(path)
    cases = suite.profile_cases(profile)
    for flag, asked, known in (("--shape", shapes, {c.shape for c in cases}), ("--impl", impls, {c.impl for c in cases}),
                               ("--dtype", dtypes, {c.dtype for c in cases})):
        unknown = sorted(set(asked or ()) - known)
        if unknown:  # a typo would silently drop cases
            print(f"mmfuse bench: {flag}: expected names from {sorted(known)}, got {unknown}")
            return 2
    # mmfuse itself always runs: a baseline's row alone has nothing to be compared with.
    selected = [c for c in cases if (not ops or c.op in ops)
                and (not shapes or c.shape in shapes) and (not impls or c.impl in impls or c.impl == "mmfuse")
                and (not dtypes or c.dtype in dtypes)]
    if not selected:
        asked = [f"--{k} {' '.join(v)}" for k, v in (("op", ops), ("shape", shapes), ("impl", impls),
                                                     ("dtype", dtypes)) if v]
        print(f"mmfuse bench: no cases match {' '.join(asked)}")
        return 2
    rows = suite.run_suite(selected, **({"timer": timer} if timer else {}))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "gpu"
    for kind, path in suite.write_results(rows, out_dir, gpu).items():
        print(f"mmfuse bench: {kind} -> {path}")
    return 1 if any("error" in r and r.get("impl") == "mmfuse" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
