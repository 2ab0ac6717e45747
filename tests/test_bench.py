"""The benchmark suite's logic on CPU: the case table, the runner with the timer mocked, the results
files, and `mmfuse bench` without a GPU (which writes the exact report instead)."""

import csv
import json
import os
import time

import pytest
import torch

from mmfuse import cli
from mmfuse.bench import readme, shapes, suite


def test_every_op_shape_mode_dtype_and_baseline_is_a_case():
    all_cases = suite.cases()
    names = [c.name for c in all_cases]
    assert len(names) == len(set(names))
    # 2 dtypes; MLP: 5 implementations forward, 4 forward+backward (_addmm_activation has no derivative);
    # gated and merged MLPs: 4 both ways; patch embedding (images and video): 4 both ways, and the video
    # shapes on pre-cut rows 4 both ways (the drop-in's F.linear, mmfuse's GEMM, Conv3d, compiled);
    # cross-attention: 7 both ways.
    video = sum(s.temporal > 1 for s in shapes.PATCH_SHAPES)
    expected = 2 * ((5 + 4) * len(shapes.MLP_SHAPES) + 2 * 4 * len(shapes.GATED_SHAPES)
                    + 2 * 4 * len(shapes.MERGED_SHAPES) + 2 * 4 * len(shapes.PATCH_SHAPES) + 2 * 4 * video
                    + 2 * 7 * len(shapes.ATTENTION_SHAPES))
    assert len(all_cases) == expected
    assert {c.shape for c in all_cases if c.op == "patch_embed"} == {s.name for s in shapes.PATCH_SHAPES}
    assert {c.impl for c in all_cases if c.op == "cross_attention"} == {
        "mmfuse", "eager", "sdpa flash", "sdpa efficient", "sdpa cudnn", "sdpa math", "sdpa enable_gqa"}
    assert {c.impl for c in all_cases if c.op == "mlp"} >= {"eager", "torch.compile", "addmm_activation"}
    # FLOPs of the LLaVA-1.5-7B projector at 8 images: 2*M*(1024*4096 + 4096*4096).
    llava = next(c for c in all_cases if c.shape == "llava-1.5-7b")
    assert llava.flops == 2 * 4608 * (1024 * 4096 + 4096 * 4096)


def test_every_patch_implementation_computes_the_same_tokens_images_and_video():
    impls = suite._patch_impls()
    for px, w, n in ((torch.randn(2, 3, 28, 42), torch.randn(5, 3, 14, 14), 6),
                     (torch.randn(2, 3, 4, 28, 42), torch.randn(5, 3, 2, 14, 14), 12)):
        args = [px, w, torch.randn(5), torch.randn(n, 5)]
        ref = impls["eager"](*args)
        for name in ("mmfuse", "reshape+GEMM"):
            torch.testing.assert_close(impls[name](*args), ref, rtol=1e-4, atol=1e-4)


def test_pre_cut_rows_implementations_agree():
    # Qwen2.5-VL's input form: rows of C*T*P*P pixels; the tower's Conv3d and mmfuse's one GEMM.
    impls = suite._patch_rows_impls()
    rows, w = torch.randn(6, 3 * 2 * 4 * 4), torch.randn(5, 3, 2, 4, 4)
    for b in (None, torch.randn(5)):
        torch.testing.assert_close(impls["mmfuse"](rows, w, b), impls["eager"](rows, w, b), rtol=1e-4, atol=1e-4)
    case = next(c for c in suite.cases() if c.op == "patch_rows" and c.shape == "qwen2.5-vl-7b")
    r, w, b = case.make("meta", torch.bfloat16)
    assert r.shape == (8 * shapes.by_name("qwen2.5-vl-7b").tokens, 3 * 2 * 14 * 14) and b is None


def test_video_case_builds_conv3d_inputs():
    case = next(c for c in suite.cases() if c.shape == "qwen2-vl" and c.impl == "eager")
    px, w, b, pos = case.make("meta", torch.bfloat16)
    s = shapes.by_name("qwen2-vl")
    assert px.dim() == 5 and tuple(w.shape) == (s.dim, s.channels, s.temporal, s.patch, s.patch)
    assert tuple(pos.shape) == (s.tokens, s.dim) and case.flops == 2 * 8 * s.tokens * s.dim * 3 * 2 * 14 * 14


def test_forward_backward_step_returns_gradients_without_accumulating():
    case = suite.Case("mlp", "tiny", "fwd+bwd", "float32", "eager", 1.0, _tiny_cases()[0].make)
    sets, step = suite.prepare(case, "cpu")
    step(sets[0])
    assert all(t.requires_grad and t.grad is None for t in suite._tensors(sets[0]))


@pytest.mark.parametrize("bias", [True, False])
def test_every_gated_implementation_computes_the_same_output(bias):
    impls = suite._gated_impls()
    x, w = torch.randn(5, 8), [torch.randn(6, 8), torch.randn(6, 8), torch.randn(4, 6)]
    b = [torch.randn(n) if bias else None for n in (6, 6, 4)]
    ref = impls["eager"](x, w, b)
    for name in ("mmfuse", "mmfuse linears"):  # torch.compile: the same function, not compiled on CI's CPU
        torch.testing.assert_close(impls[name](x, w, b), ref, rtol=1e-5, atol=1e-5)
    case = suite.Case("gated_mlp", "tiny", "fwd+bwd", "float32", "mmfuse", 1.0, lambda device, dtype: [x, w, b])
    sets, step = suite.prepare(case, "cpu")
    step(sets[0])
    assert all(t.requires_grad and t.grad is None for t in suite._tensors(sets[0]))


@pytest.mark.parametrize("norm,post,table,gated,pool", [("rms", False, False, False, False),
                                                        ("layer", True, True, False, False),
                                                        ("layer", True, True, True, False),
                                                        ("rms", True, True, False, True)])
def test_every_merged_implementation_computes_the_same_output(norm, post, table, gated, pool):
    impls = suite._merged_impls()
    T, C, G = 16, 8, 4
    x, ws, bs = torch.randn(T, C), [torch.randn(12, G * C), torch.randn(5, 12)], [torch.randn(12), torch.randn(5)]
    if gated:  # Aya Vision: a chunked [up | gate] weight of 2 x 6, down reads 6
        ws[1], bs[1] = torch.randn(5, 6), torch.randn(5)
    if pool:  # Gemma 3: the pooled rows (C wide) times one weight, no bias
        ws, bs = [torch.randn(5, C)], [None]
    width = G * C if post and not pool else C
    spec = suite.MergeSpec(G, torch.randperm(T).view(-1, G) if table else None, norm, post, gated, pool)
    args = [x, ws, bs, torch.randn(width), torch.randn(width) if norm == "layer" else None, spec]
    ref = impls["eager"](*args)
    for name in ("mmfuse", "mmfuse glue"):
        torch.testing.assert_close(impls[name](*args), ref, rtol=1e-5, atol=1e-5)
    case = suite.Case("merged_mlp", "tiny", "fwd+bwd", "float32", "mmfuse", 1.0, lambda device, dtype: args)
    sets, step = suite.prepare(case, "cpu")
    step(sets[0])


def _tiny_cases():
    def make_mlp(device, dtype):
        return [torch.randn(5, 8, dtype=dtype), [torch.randn(16, 8, dtype=dtype), torch.randn(4, 16, dtype=dtype)],
                [torch.randn(16, dtype=dtype), torch.randn(4, dtype=dtype)]]

    def make_attn(device, dtype):
        return [torch.randn(1, 2, 3, 8, dtype=dtype), torch.randn(2, 1, 5, 8, dtype=dtype),
                torch.randn(2, 1, 5, 8, dtype=dtype)]

    return [suite.Case("mlp", "tiny", mode, "float32", impl, 1e6, make_mlp)
            for mode in ("fwd", "fwd+bwd") for impl in ("mmfuse", "eager")] + [
        suite.Case("mlp", "tiny", "fwd", "float32", "addmm_activation", 1e6, make_mlp)] + [
        suite.Case("cross_attention", "tiny", "fwd", "float32", impl, 1e6, make_attn)
        for impl in ("mmfuse", "sdpa math", "sdpa enable_gqa")] + [
        suite.Case("cross_attention", "tiny", "fwd+bwd", "float32", impl, 1e6, make_attn)
        for impl in ("mmfuse", "eager")]


class FakeTimer:
    """Runs each step once (the code path is real), returns made-up but fixed milliseconds."""

    def __init__(self):
        self.calls = 0

    def __call__(self, sets, step):
        step(sets[0])
        self.calls += 1
        return 2.0 if self.calls % 2 else 1.0


def test_runner_with_a_mocked_timer_and_results_files(tmp_path):
    roof = suite.ceilings(FakeTimer(), "cpu", n=64, copy_bytes=1024)  # 2*64^3 flops in 2 ms; 2 KB in 1 ms
    assert roof == {"tflops": pytest.approx(2 * 64**3 / 2.0 / 1e9), "gbps": pytest.approx(2 * 1024 / 1.0 / 1e6)}
    rows = suite.run_suite(_tiny_cases(), timer=FakeTimer(), device="cpu", progress=lambda msg: None, roof=roof)
    assert rows[0]["ceilings"] == roof
    data = rows[1:]
    assert len(data) == 10 and all("ms" in r for r in data), [r.get("error") for r in data]
    for r in data:
        # forward + backward: 3 forwards of FLOPs for a GEMM, 3.5 for attention (its backward is 2.5)
        factor = 1 if r["mode"] == "fwd" else (3.5 if r["op"] == "cross_attention" else 3)
        assert r["tflops"] == pytest.approx(1e6 * factor / r["ms"] / 1e9)
        # The floor bytes of the tiny MLP: x (5x8) + W (16x8, 4x16) + b (16, 4) fp32 = 1008 B forward.
        if r["op"] == "mlp":
            assert r["min_bytes"] == 4 * (40 + 128 + 64 + 16 + 4) * (3 if r["mode"] == "fwd+bwd" else 1)
            assert r["gbps"] == pytest.approx(r["min_bytes"] / r["ms"] / 1e6)
        assert "mmfuse_speedup" in r
    paths = suite.write_results(rows, str(tmp_path), "Fake GPU", date="2026-11-24")
    saved = json.loads(open(paths["json"]).read())
    assert saved["gpu"] == "Fake GPU" and len(saved["rows"]) == 11
    with open(paths["csv"]) as f:
        assert len(list(csv.DictReader(f))) == 10
    assert "(measured)" in open(paths["md"]).read()
    assert paths["json"].endswith("Fake_GPU-2026-11-24.json")


def test_a_failing_baseline_is_reported_not_fatal():
    bad = suite.Case("mlp", "tiny", "fwd", "float32", "nonesuch", 1.0, _tiny_cases()[0].make)
    rows = suite.run_suite([bad], timer=FakeTimer(), device="cpu", progress=lambda msg: None,
                           roof={"tflops": 1.0, "gbps": 1.0})
    assert "KeyError" in rows[1]["error"]


@pytest.mark.xdist_group("aot")  # the report reuses the compile results of tests/test_aot.py
def test_mmfuse_bench_without_a_gpu_writes_the_report(tmp_path, capsys):
    assert cli._bench(str(tmp_path), cuda=False) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU" in out
    (report,) = tmp_path.glob("no-gpu-*-report.md")
    assert "# mmfuse report" in report.read_text()


def test_mmfuse_bench_on_a_gpu_path_with_the_timer_mocked(tmp_path, monkeypatch, capsys):
    # The command as a GPU run takes it: cases, ceilings, timing, result files, exit code (the tiny
    # cases build CPU tensors whatever device they are asked for).
    monkeypatch.setattr(suite, "cases", _tiny_cases)
    monkeypatch.setattr(suite, "ceilings", lambda timer, device: {"tflops": 700.0, "gbps": 2900.0})
    assert cli._bench(str(tmp_path), ops=["mlp"], timer=FakeTimer(), cuda=True) == 0
    out = capsys.readouterr().out
    assert "[1/5] mlp/tiny/fwd/float32/mmfuse\n    2.0000 ms\n" in out and "[5/5]" in out  # each result as it comes
    (result,) = tmp_path.glob("*.json")
    rows = json.loads(result.read_text())["rows"]
    assert rows[0] == {"ceilings": {"tflops": 700.0, "gbps": 2900.0}} and len(rows) == 6
    assert {p.suffix for p in tmp_path.iterdir()} >= {".json", ".csv", ".md"}
    # An mmfuse case that fails makes the command fail; a failing baseline does not.
    broken = [c for c in _tiny_cases() if c.op == "mlp"]
    broken[0] = suite.Case("mlp", "tiny", "fwd", "float32", "mmfuse", 1.0, lambda device, dtype: [None])
    monkeypatch.setattr(suite, "cases", lambda: broken)
    assert cli._bench(str(tmp_path / "again"), ops=["mlp"], timer=FakeTimer(), cuda=True) == 1


def test_mmfuse_bench_unknown_op_exit_code(tmp_path, capsys):
    assert cli._bench(str(tmp_path), ops=["nonesuch"], timer=FakeTimer(), cuda=True) == 2
    # a name no case has is refused, not silently dropped
    assert cli._bench(str(tmp_path), shapes=["qwen2.5-vl-7b-merger", "nonesuch"], timer=FakeTimer(), cuda=True) == 2
    assert "--shape: expected names from" in capsys.readouterr().out
    assert cli._bench(str(tmp_path), impls=["torch.compiled"], timer=FakeTimer(), cuda=True) == 2
    assert "--impl: expected names from" in capsys.readouterr().out
    # known names that select nothing together
    assert cli._bench(str(tmp_path), ops=["cross_attention"], shapes=["qwen2.5-vl-7b-merger"], timer=FakeTimer(),
                      cuda=True) == 2
    assert "no cases match --op cross_attention --shape qwen2.5-vl-7b-merger" in capsys.readouterr().out


def test_mmfuse_bench_selects_shapes_implementations_and_dtypes(tmp_path, monkeypatch):
    """`mmfuse bench --shape S --impl I --dtype D` (a short GPU run of a few baselines, torch.compile's
    included): those cases, mmfuse's always with them."""
    seen = []
    monkeypatch.setattr(suite, "run_suite", lambda selected, **timer: seen.extend(selected) or [])
    argv = ["bench", "--out-dir", str(tmp_path), "--op", "merged_mlp", "mlp", "--shape", "qwen2.5-vl-7b-merger",
            "siglip-so400m-tower-mlp", "--impl", "eager", "torch.compile", "--dtype", "bfloat16"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    assert cli.main(argv) == 0
    got = {(c.op, c.shape, c.mode, c.dtype, c.impl) for c in seen}
    assert got == {(op, shape, mode, "bfloat16", impl)
                   for op, shape in (("merged_mlp", "qwen2.5-vl-7b-merger"), ("mlp", "siglip-so400m-tower-mlp"),
                                     ("mlp", "qwen2.5-vl-7b-merger"))  # (also an MLP shape: the merger unmerged)
                   for mode in ("fwd", "fwd+bwd") for impl in ("mmfuse", "eager", "torch.compile")}


def _readme(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("# x\n## Results\n<!-- results:start -->\nold\n<!-- results:end -->\n## After\nkept\n")
    return path


def test_readme_section_says_modelled_without_timings(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "no-gpu-2026-11-23-report.md").write_text("# mmfuse report\n")
    (results / "no-gpu-2026-11-24-report.md").write_text("# mmfuse report\n")
    path = _readme(tmp_path)
    assert readme.rewrite(str(path), str(results))
    text = path.read_text()
    assert "no measured timings" in text and "no-gpu-2026-11-24-report.md" in text and "old" not in text
    assert text.endswith("<!-- results:end -->\n## After\nkept\n")
    assert not readme.rewrite(str(path), str(results))  # idempotent


def test_readme_section_from_a_measured_file(tmp_path):
    rows = suite.run_suite(_tiny_cases()[:2], timer=FakeTimer(), device="cpu", progress=lambda m: None,
                           roof={"tflops": 700.0, "gbps": 2900.0})
    suite.write_results(rows, str(tmp_path / "results"), "Fake GPU", date="2026-11-24")
    # A kernel profile beside it (gpu-check's last step) is not a benchmark file, however it sorts.
    (tmp_path / "results" / "kernel-profile-Fake_GPU-2026-11-24.json").write_text("{}")
    path = _readme(tmp_path)
    readme.rewrite(str(path), str(tmp_path / "results"))
    text = path.read_text()
    # FakeTimer: mmfuse 2.0 ms, eager 1.0 ms -> eager is the fastest baseline, mmfuse 0.5x.
    assert "Measured on **Fake GPU**, 2026-11-24" in text and "700 TFLOP/s" in text
    assert "| mlp/tiny/fwd/float32 | 2.0000 | eager | 1.0000 | 0.50x |" in text


def test_readme_compares_with_pytorch_baselines_only(tmp_path):
    """An mmfuse variant without the op's fusion ("mmfuse GEMM", faster than eager here) is not what a user
    would run instead: the row names the fastest PyTorch baseline."""
    rows = suite.run_suite(_tiny_cases()[:2], timer=FakeTimer(), device="cpu", progress=lambda m: None)
    eager = next(r for r in rows if r.get("impl") == "eager")
    rows.append(dict(eager, case=eager["case"].replace("/eager", "/mmfuse GEMM"), impl="mmfuse GEMM", ms=0.5))
    suite.write_results(rows, str(tmp_path / "results"), "Fake GPU", date="2026-11-24")
    path = _readme(tmp_path)
    readme.rewrite(str(path), str(tmp_path / "results"))
    assert "| mlp/tiny/fwd/float32 | 2.0000 | eager | 1.0000 | 0.50x |" in path.read_text()


def test_readme_without_markers_is_an_error(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("# x\n")
    with pytest.raises(ValueError, match="markers"):
        readme.rewrite(str(path), str(tmp_path))


# ----------------------------------------------------------------------------------------------
# mmfuse gpu-check and the quick profile (the GPU run's logic, on CPU)
# ----------------------------------------------------------------------------------------------
def test_quick_profile_is_two_shapes_per_op_bf16_cheap_baselines():
    quick = suite.profile_cases("quick")
    assert {c.dtype for c in quick} == {"bfloat16"} and {c.mode for c in quick} == {"fwd", "fwd+bwd"}
    for op in ("mlp", "gated_mlp", "merged_mlp", "patch_embed", "patch_rows", "cross_attention"):
        cases = [c for c in quick if c.op == op]
        # two shapes per op; the MLP has two more: single Linear projections (no activation to fuse)
        assert len({c.shape for c in cases}) == (4 if op == "mlp" else 2), op
        assert {"mmfuse", "eager"} <= {c.impl for c in cases}
        assert not any("compile" in c.impl for c in cases)  # no compile step within the budget
    assert {c.name for c in quick} <= {c.name for c in suite.cases()}
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(readme) as f:  # the README states the count
        assert f"`mmfuse bench --profile quick` ({len(quick)} cases)" in f.read()
    assert suite.profile_cases("full") == suite.cases()
    with pytest.raises(ValueError, match="profile"):
        suite.profile_cases("fast")


class FakeRun:
    """subprocess.run stand-in: records each step, 'runs' it for the seconds given (on a fake clock)."""

    def __init__(self, clock, seconds, rcs=None, hang=()):
        self.clock, self.seconds, self.rcs, self.hang, self.calls = clock, seconds, rcs or {}, hang, []

    def __call__(self, argv, cwd, env, stdout, stderr, timeout):
        import subprocess

        step = ("verify" if "verify" in argv else "profile" if "mmfuse.bench.kernel_profile" in argv
                else "bench" if "bench" in argv else "tests")
        self.calls.append((step, argv, env, cwd, timeout))
        if step in self.hang:
            self.clock.t += timeout
            raise subprocess.TimeoutExpired(argv, timeout)
        self.clock.t += self.seconds
        stdout.write(f"{step} output\n")
        return subprocess.CompletedProcess(argv, self.rcs.get(step, 0))


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


ENV = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "mmfuse": "0.1.0",
       "python": "3.12.3"}


def test_gpu_check_runs_verify_tests_bench_in_order_and_writes_as_it_goes(tmp_path):
    from mmfuse import gpu_check

    clock = FakeClock()
    run = FakeRun(clock, seconds=30.0)
    rc = gpu_check.main(str(tmp_path), budget_s=480, run=run, env_info=lambda: ENV, clock=clock,
                        print=lambda *a: None, verify_shards=1)
    assert rc == 0
    assert [c[0] for c in run.calls] == ["verify", "tests", "bench", "profile"]
    verify, tests, bench, profile = run.calls
    assert verify[1][-3:] == ["verify", "--device", "cuda"]
    assert tests[2]["MMFUSE_TEST_DEVICE"] == "cuda" and any(a.endswith("tests/test_cross_attention.py") for a in tests[1])
    assert bench[1][-5:] == ["bench", "--profile", "quick", "--out-dir", str(tmp_path)]
    assert profile[1][-3:] == ["mmfuse.bench.kernel_profile", "--out-dir", str(tmp_path)]
    # Steps run outside the repository (the source folder has no mmfuse.kernels) and within the budget.
    assert all(not c[3].startswith(gpu_check.REPO) for c in run.calls)
    assert verify[4] == pytest.approx(480 * gpu_check.SHARES["verify"])
    assert tests[4] == pytest.approx((480 - 30) * gpu_check.SHARES["tests"])
    (folder,) = tmp_path.glob("gpu-check-NVIDIA_H100_80GB_HBM3-*")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["torch"] == "2.11.0" and summary["triton"] == "3.6.0"
    assert [(s["step"], s["rc"], s["seconds"]) for s in summary["steps"]] == [
        ("verify", 0, 30.0), ("tests", 0, 30.0), ("bench", 0, 30.0), ("profile", 0, 30.0)]
    assert (folder / "tests.txt").read_text() == "tests output\n"


def test_gpu_check_a_hung_step_times_out_and_the_rest_still_runs(tmp_path):
    from mmfuse import gpu_check

    clock = FakeClock()
    run = FakeRun(clock, seconds=20.0, rcs={"bench": 1}, hang=("tests",))
    rc = gpu_check.main(str(tmp_path), budget_s=480, run=run, env_info=lambda: ENV, clock=clock,
                        print=lambda *a: None, verify_shards=1)
    assert rc == 1
    (folder,) = tmp_path.glob("gpu-check-*")
    steps = json.loads((folder / "summary.json").read_text())["steps"]
    assert [(s["step"], s["rc"]) for s in steps] == [("verify", 0), ("tests", "timeout"), ("bench", 1),
                                                     ("profile", 0)]
    assert "stopped after" in (folder / "tests.txt").read_text()
    # The whole check stays inside its budget: the bench got what was left.
    assert sum(c[4] if c[0] == "tests" else 20.0 for c in run.calls) <= 480


def test_gpu_check_runs_the_tests_of_the_checkout_it_is_given_not_of_site_packages(tmp_path, monkeypatch):
    # The first GPU run (2026-11-26) installed mmfuse from a wheel: REPO pointed into site-packages,
    # which holds no tests, and step 2 died on a missing pyproject.toml. bench/gpu-check now exports
    # MMFUSE_REPO; a checkout without the tests is a clear "not runnable", and the other steps still run.
    import importlib

    from mmfuse import gpu_check

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("MMFUSE_REPO", repo)
    assert importlib.reload(gpu_check).REPO == repo
    argv, _ = gpu_check.step_command("tests", str(tmp_path))
    assert os.path.join(repo, "tests", "test_linear.py") in argv
    site = tmp_path / "site"
    (site / "mmfuse").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="MMFUSE_REPO"):
        gpu_check.step_command("tests", str(tmp_path), repo=str(site))
    monkeypatch.setattr(gpu_check, "REPO", str(site))
    clock = FakeClock()
    run = FakeRun(clock, seconds=10.0)
    rc = gpu_check.main(str(tmp_path / "out"), budget_s=480, run=run, env_info=lambda: ENV, clock=clock,
                        print=lambda *a: None, verify_shards=1)
    assert rc == 1 and [c[0] for c in run.calls] == ["verify", "bench", "profile"]
    (folder,) = (tmp_path / "out").glob("gpu-check-*")
    assert "MMFUSE_REPO" in (folder / "tests.txt").read_text()
    with open(os.path.join(repo, "bench", "gpu-check")) as f:
        assert 'export MMFUSE_REPO="$repo"' in f.read()


def test_gpu_check_with_the_budget_spent_skips_and_fails(tmp_path):
    from mmfuse import gpu_check

    clock = FakeClock()
    run = FakeRun(clock, seconds=300.0)
    rc = gpu_check.main(str(tmp_path), budget_s=300, steps=["verify", "bench"], run=run, env_info=lambda: ENV,
                        clock=clock, print=lambda *a: None, verify_shards=1)
    assert rc == 1 and [c[0] for c in run.calls] == ["verify"]
    with pytest.raises(ValueError, match="steps"):
        gpu_check.main(str(tmp_path), steps=["nonesuch"], run=run, env_info=lambda: ENV, print=lambda *a: None)


def test_mmfuse_bench_quick_profile_selects_the_quick_cases(tmp_path, monkeypatch):
    # The GPU path of `mmfuse bench --profile quick`, with the suite runner replaced by a recorder.
    seen = []

    def run_suite(selected, timer):
        seen.extend(selected)
        return [{"ceilings": {"tflops": 700.0, "gbps": 2900.0}}]

    monkeypatch.setattr(suite, "run_suite", run_suite)
    assert cli._bench(str(tmp_path), timer=FakeTimer(), cuda=True, profile="quick") == 0
    assert [c.name for c in seen] == [c.name for c in suite.profile_cases("quick")] and len(seen) > 20


def test_kernel_profile_finds_every_kernel_family_and_reports_failed_parts():
    # The GPU-only parts run in `mmfuse gpu-check`; here: what they read and how a failure is reported.
    from mmfuse.bench import kernel_profile

    names = {n for n, _ in kernel_profile._jit_functions()}
    assert {"linear.fused_gemm_kernel", "patch_embed.patch_embed_dw_kernel", "cross_attention.attn_fwd_kernel",
            "cross_attention.attn_bwd_dq_kernel"} <= names
    md = kernel_profile.markdown({
        "gpu": "G", "date": "D", "compiled": {"error": "Traceback\nRuntimeError: boom"},
        "kernels": [{"case": "c", "error": "Traceback\nValueError: bad"},
                    {"case": "ok", "wall_us_per_step": 12.0, "kernel_us_per_step": 5.0,
                     "kernels": [{"kernel": "attn_fwd_kernel", "us_per_step": 5.0, "launches_per_step": 1.0}]}],
        "gemm_tiles": [{"gemm": "fwd", "tile": "128x128x64x8x4", "ms": 0.1, "tflops": 330.0, "chosen": True},
                       {"gemm": "dW", "tile": "tma 64x64x64x4x4", "ms": 0.2, "tflops": 99.0, "shape": "one image"}]})
    assert "## GEMM tiles (bf16, one image)" in md and md.index("one image)") < md.index("| dW | tma 64x64x64x4x4 |")
    assert "c: failed: ValueError: bad" in md and "## compiled: failed" in md and "RuntimeError: boom" in md
    assert "| fwd | 128x128x64x8x4 | 0.1000 | 330 |  | yes |" in md and "attn_fwd_kernel" in md


def test_kernel_profile_gemm_sweep_runs_every_variant(monkeypatch):
    # The sweep's GPU part with the interpreter and a fake timer: every variant launches (none fails),
    # and the launcher's defaults are marked once per kernel and GEMM.
    from mmfuse.bench import kernel_profile
    from mmfuse.kernels import linear as KL

    calls, timed = [], []
    rows = kernel_profile.gemm_tile_sweep(M=24, K=40, N=48, device="cpu", bench=lambda f: calls.append(f()) or 1.0,
                                          device_timer=lambda f: timed.append(f()) or 0.5)
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r][:2]
    assert KL.TMA == "auto"  # restored
    kinds = {r["gemm"] for r in rows}
    assert len(kinds) == 3 and len(calls) == len(rows) == len(timed)
    assert all(r["device_ms"] == 0.5 for r in rows)
    assert [r["gemm"] for r in rows if r["tile"] == "torch.mm + epilogue pass"] == [
        "fwd y=gelu(xW^T+b), aux", "dX dH2 W2 * gelu'(h)"]
    assert {r["tile"] for r in rows if r["tile"].startswith(("tma 128x256", "tma 256"))} == {
        "tma 128x256x64x8x3 flatten=False", "tma 256x128x64x8x3 flatten=False"}
    md = kernel_profile.markdown({"gpu": "x", "date": "d", "gemm_tiles": [dict(r, shape="s") for r in rows]})
    assert "| dW dH^T X | torch.mm | 1.0000 | 0 | 0.5000 |  |" in md
    for g in kinds:
        chosen = [r["tile"] for r in rows if r["gemm"] == g and r.get("chosen")]
        assert [t.split()[0] for t in chosen] == ["pointer", "tma"], (g, chosen)


def test_kernel_profile_attention_split_sweep(monkeypatch):
    """The sweep's GPU part with the interpreter, small shapes and a fake timer: both merges run at their
    own split counts and agree bit for bit (the GPU run records the same check); the markdown lists it."""
    from mmfuse.bench import kernel_profile
    from mmfuse.bench.shapes import AttentionShape
    from mmfuse.kernels import cross_attention as KA

    seen = []
    monkeypatch.setattr(KA, "choose_fwd_splits",
                        lambda *a, in_kernel=False, **k: seen.append((a[7], k["blocks"])) or (3 if in_kernel else 2))
    shapes = [AttentionShape("tiny", 17, 100, 4, 2, 24)]
    rows = kernel_profile.attention_split_sweep(batch=2, device="cpu", bench=lambda f: f() and 1.0, shapes=shapes,
                                                device_timer=lambda f: f() and 0.25)
    assert [(r["impl"], r["splits"]) for r in rows] == [("mmfuse, merge by launch", 2), ("mmfuse, merge by kernel", 3),
                                                         ("mmfuse, merge by auto", 2)]
    assert rows[-1]["equal"] is True and "equal" not in rows[0] and "equal" not in rows[1]
    # fp32 (4-byte) at the tiles the launcher takes for it (the interpreter's here)
    assert seen and all(elem == 4 and blocks == KA.blocks_for(17, 24, elem_bytes=4, ieee=True) for elem, blocks in seen)
    md = kernel_profile.markdown({"gpu": "x", "date": "d", "attention_splits": rows})
    assert "| tiny | float32 | mmfuse, merge by auto | 2 | 1.0000 | 0.2500 | yes |" in md
    assert "| tiny | float32 | mmfuse, merge by kernel | 3 | 1.0000 | 0.2500 |  |" in md
    assert "| tiny | float32 | mmfuse, merge by launch | 2 | 1.0000 | 0.2500 |  |" in md


def test_kernel_profile_attention_pipeline_sweep():
    """The depth sweep with the interpreter at GPU tiles and a fake timer: each forward row runs under its
    own stages and warps (read back from the launchers' one source of tiles while timed), each backward
    row under its stages (dK/dV's too), the launchers' tiles are restored after, and the markdown lists
    every row, SDPA's included."""
    from mmfuse.bench import kernel_profile
    from mmfuse.bench.shapes import AttentionShape
    from mmfuse.kernels import _common
    from mmfuse.kernels import cross_attention as KA

    shape = AttentionShape("tiny", 17, 100, 4, 2, 24)
    seen = []

    def timer(fn):
        out = fn()
        assert all(torch.isfinite(t).all() for t in out if t is not None)
        seen.append((KA.blocks_for(17, 24), KA.blocks_for(17, 24, backward=True)))
        return 0.5

    packs = []
    real_fwd = KA.attention_fwd

    split_counts = []

    def recording_fwd(*a, pack_gqa=False, **kw):
        packs.append(pack_gqa)
        split_counts.append(a[6] if len(a) > 6 else kw.get("splits"))
        return real_fwd(*a, pack_gqa=pack_gqa, **kw)

    before = (KA.gpu_blocks(17, 24), KA.gpu_blocks(17, 24, backward=True))
    with _common.gpu_config(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(KA, "attention_fwd", recording_fwd)
        rows = kernel_profile.attention_pipeline_sweep(device="cpu", timer=timer, shapes=[shape],
                                                       cases=(("tiny", 2, ((2, 8, 16), (4, 4, 64, 3)),
                                                                       (2, {"stages": 3, "dq_tile": (16, 32, 4)},
                                                                        {"stages": 3, "dq_splits": (1, 2)})),))
        after = (KA.gpu_blocks(17, 24), KA.gpu_blocks(17, 24, backward=True))
    assert after == before
    assert [(r["pass"], r.get("stages"), r.get("warps"), r.get("impl")) for r in rows] == [
        ("fwd", 2, 8, None), ("fwd", 4, 4, None), ("bwd", 2, 8, None), ("bwd", 3, 4, None), ("bwd", 3, 8, None),
        ("fwd", None, None, "sdpa enable_gqa")]
    assert [(f["num_stages"], f["num_warps"], f["BLOCK_M"]) for f, _ in seen[:2]] == [(2, 8, 16), (4, 4, 64)]
    # a tile taller than one head's 17 queries packs the grouped heads; the backward's forward does not
    assert [r.get("packed") for r in rows[:2]] == [False, True] and packs == [False, True, False]
    assert (seen[2][1]["num_stages"], KA.dkdv_stages(seen[2][1])) == (2, 2) and seen[2][0] == before[0]
    # the second backward row gives dQ a tile of its own (``dq_blocks``), dK/dV keeping the launcher's
    dq, kv = KA.dq_blocks(seen[3][1]), seen[3][1]
    assert (dq["BLOCK_M"], dq["BLOCK_N"], dq["num_warps"], dq["num_stages"]) == (16, 32, 4, 3), dq
    shared = ("BLOCK_M", "BLOCK_N", "num_warps")
    assert tuple(kv[n] for n in shared) == tuple(before[1][n] for n in shared)
    md = kernel_profile.markdown({"gpu": "x", "date": "d", "attention_pipeline": rows})
    assert "| tiny | 2 | fwd | mmfuse | 4 | 4 | 64 (packed) | 3 | 0.5000 |  |" in md
    assert "| tiny | 2 | fwd | mmfuse | 2 | 8 | 16 | auto | 0.5000 |  |" in md
    assert "| tiny | 2 | bwd | mmfuse | 2 | 8 |  |  | 0.5000 |  |" in md
    assert "| tiny | 2 | bwd | mmfuse | 3 | 4 | 16x32 |  | 0.5000 |  |" in md
    assert "| tiny | 2 | bwd | mmfuse | 3 | 8 |  | 1x2 | 0.5000 |  |" in md
    # on a GPU each backward row also carries every kernel's device time (``device_ms(by_kernel=True)``)
    row = dict(rows[3], kernels_ms={"attn_bwd_dq_kernel": 0.125, "void at::native::reduce_kernel<512, 1>(...)": 0.01})
    by_kernel = kernel_profile.markdown({"gpu": "x", "date": "d", "attention_pipeline": [row]})
    assert "| 0.5000 | attn_bwd_dq 0.1250, void at::native::reduce 0.0100 |" in by_kernel
    assert "| tiny | 2 | fwd | sdpa enable_gqa |  |  |  |  | 0.5000 |  |" in md
    assert [r.get("splits") for r in rows[:2]] == [None, 3] and split_counts[1] == 3


def test_kernel_profile_mapped_gemm_forms(monkeypatch):
    """The merged GEMM taken apart, with the interpreter on a small table shape: every form launches and
    writes its whole output (outputs are NaN-poisoned under the tests), and the markdown puts each
    against the unmapped GEMM. (The forms' values are the merged GEMM's, tested in test_merged_mlp.py.)"""
    from mmfuse.bench import kernel_profile
    from mmfuse.bench.shapes import MergedShape

    shape = MergedShape("tiny", 16, 8, 4, (24, 8), "layer", norm_after_merge=True, table=True)
    outputs = []
    rows = kernel_profile.mapped_gemm_forms(device="cpu", bench=lambda f: outputs.append(f()) or 1.0,
                                            shapes=(("tiny, 2 tiles", shape, 2),))
    forms = [r["form"] for r in rows]
    assert forms == ["unmapped GEMM (A written)", "table gather, no norm", "table gather + layer norm in the load",
                     "table gather + rms folded into W", "view gather, no norm", "view gather + layer norm in the load",
                     "view gather + rms folded into W"]
    assert all(r["ms"] == 1.0 and (r["M"], r["K"], r["N"]) == (8, 32, 24) for r in rows)
    # (the unmapped GEMM writes into a buffer of the sweep's own and returns nothing)
    assert len(outputs) == len(rows) and outputs[0] is None
    assert all(y.shape == (8, 24) and y.isfinite().all() for y, _ in outputs[1:])
    md = kernel_profile.markdown({"gpu": "x", "date": "d", "mapped_forms": rows})
    assert "| tiny, 2 tiles | table gather + layer norm in the load | 8 x 32 x 24 | 1.0000 |" in md
    assert md.count("| 1.00 |") == len(rows)


def test_pixel_shuffle_table_is_internvls_order():
    """The sweep's table is InternVL's pixel shuffle (transformers' own `InternVLModel.pixel_shuffle`,
    scale 0.5, run on token ids), not a random permutation: each merged row a 2x2 neighbourhood."""
    from transformers.models.internvl.modeling_internvl import InternVLModel

    from mmfuse.bench import kernel_profile

    table = kernel_profile._pixel_shuffle_table(2, 16, "cpu")
    ids = torch.arange(32, dtype=torch.float32).view(2, 4, 4, 1)
    want = InternVLModel.pixel_shuffle(None, ids).reshape(-1, 4).to(torch.int32)
    assert torch.equal(table, want)
    assert table[0].tolist() == [0, 1, 4, 5]  # (0, 0), (0, 1), (1, 0), (1, 1) of the 4 x 4 grid


def test_shapes_quoted_from_transformers_defaults_match_them():
    """bench/shapes.py rows whose comment says "transformers' default": the sizes are that default
    config's (the checkpoint its docstring names), checked here against the installed transformers."""
    T = pytest.importorskip("transformers").models
    vip = T.vipllava.VipLlavaConfig()
    grid = (vip.vision_config.image_size // vip.vision_config.patch_size) ** 2
    assert shapes.by_name("vipllava-7b") == shapes.MLPShape(
        "vipllava-7b", grid, (vip.vision_config.hidden_size * len(vip.vision_feature_layers),
                              vip.text_config.hidden_size, vip.text_config.hidden_size))
    vl = T.video_llava.VideoLlavaConfig()
    assert shapes.by_name("video-llava-7b") == shapes.MLPShape(
        "video-llava-7b", (vl.vision_config.image_size // vl.vision_config.patch_size) ** 2,
        (vl.vision_config.hidden_size, vl.text_config.hidden_size, vl.text_config.hidden_size))
    pg = T.paligemma.PaliGemmaConfig()
    assert shapes.by_name("paligemma-3b-224") == shapes.MLPShape(
        "paligemma-3b-224", (pg.vision_config.image_size // pg.vision_config.patch_size) ** 2,
        (pg.vision_config.hidden_size, pg.text_config.hidden_size))
    q3 = T.qwen3_vl.Qwen3VLConfig().vision_config
    s = shapes.by_name("qwen3-vl")
    assert (s.dim, s.patch, s.temporal, s.channels) == (q3.hidden_size, q3.patch_size, q3.temporal_patch_size,
                                                         q3.in_channels)
    m = shapes.by_name("qwen3-vl-8b-merger")
    assert (m.channels, m.group, m.widths[0]) == (q3.hidden_size, q3.spatial_merge_size ** 2,
                                                  q3.hidden_size * q3.spatial_merge_size ** 2)
    iv = T.internvl.InternVLConfig().vision_config
    s = shapes.by_name("internvit-300m-448")
    assert (s.dim, s.image, s.patch) == (iv.hidden_size, tuple(iv.image_size), iv.patch_size[0])
    b2 = T.blip_2.Blip2Config().vision_config
    s = shapes.by_name("blip2-eva-vit-g")
    assert (s.dim, s.image, s.patch) == (b2.hidden_size, (b2.image_size,) * 2, b2.patch_size)


def test_kernel_profile_dynamic_m_loop_counts_its_timing_rounds(monkeypatch):
    """The dynamic-token-count loop with the interpreter, tiny widths and a CPU clock: every implementation
    runs each pass over the same distinct counts, the default policy times nothing, a second pass times
    nothing new, and the flag is restored. (The interpreter keeps one tile, so nothing is timed here; the
    at-most-once-per-octave bound itself is tests/test_tuning.py's, on the GPU launch path.)"""
    from mmfuse.bench import kernel_profile
    from mmfuse.kernels import _tuning

    counts = kernel_profile.token_counts(n=6, low=20, high=70)
    assert len(set(counts)) == 6 and all(20 <= m < 70 for m in counts)
    monkeypatch.setattr(_tuning, "_bench", lambda run: run() or 1.0)  # no GPU timer here
    rows = kernel_profile.dynamic_m_loop(counts, widths=(24, 40, 16), device="cpu", passes=2,
                                         clock=time.perf_counter)
    assert [(r["impl"], r["pass"]) for r in rows] == [
        ("mmfuse", 1), ("mmfuse", 2), ("mmfuse, MMFUSE_AUTOTUNE=1", 1), ("mmfuse, MMFUSE_AUTOTUNE=1", 2),
        ("eager", 1), ("eager", 2)]
    by = {(r["impl"], r["pass"]): r for r in rows}
    assert by[("mmfuse", 2)]["timings"] == 0 and by[("eager", 2)]["timings"] == 0
    tuned = by[("mmfuse, MMFUSE_AUTOTUNE=1", 1)]["timings"]
    assert by[("mmfuse, MMFUSE_AUTOTUNE=1", 2)]["timings"] == tuned  # the second pass times nothing new
    assert all(r["seconds"] > 0 for r in rows) and _tuning.AUTOTUNE is False
    md = kernel_profile.markdown({"gpu": "x", "date": "d", "dynamic_m": rows})
    assert "| mmfuse, MMFUSE_AUTOTUNE=1 | 2 |" in md


def test_kernel_profile_writes_its_results_after_every_part(tmp_path, monkeypatch):
    """A gpu-check step that runs out of time is killed: what the earlier parts measured is on disk by then."""
    from mmfuse.bench import kernel_profile

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(kernel_profile, "dynamic_m_loop", lambda: [
        {"impl": "mmfuse", "pass": 1, "counts": 50, "seconds": 1.0, "ms_per_step": 20.0, "timings": 0}])
    on_disk = []

    def compiled():  # the next part: the first one's results are already written
        (path,) = tmp_path.glob("kernel-profile-Fake_GPU-*.json")
        on_disk.append(json.loads(path.read_text()).get("dynamic_m"))
        return []
    monkeypatch.setattr(kernel_profile, "compiled_kernels", compiled)
    assert kernel_profile.main(str(tmp_path), parts=("dynamic_m", "compiled"), print=lambda *a: None) == 0
    assert on_disk and on_disk[0][0]["ms_per_step"] == 20.0
    assert "| mmfuse | 1 | 1.000 | 20.000 | 0 |" in next(tmp_path.glob("*.md")).read_text()


def test_gpu_check_runs_verify_in_shards_side_by_side_and_joins_their_logs(tmp_path):
    # The fourth H100 run (2026-11-27): one verify process compiling into an empty Triton cache stopped at
    # 217 of 253 after its 180 s. The shards run at once: each fake run waits at a barrier the others
    # must reach too, so shards run one after another would time out there.
    import subprocess
    import threading

    from mmfuse import gpu_check

    barrier, seen = threading.Barrier(3, timeout=10), []

    def run(argv, cwd, env, stdout, stderr, timeout):
        seen.append(argv)
        if "verify" in argv:
            barrier.wait()
            shard = argv[argv.index("--shard") + 1]
            stdout.write(f"checks of {shard}\n")
            return subprocess.CompletedProcess(argv, 1 if shard == "1/3" else 0)
        return subprocess.CompletedProcess(argv, 0)

    rc = gpu_check.main(str(tmp_path), budget_s=480, steps=["verify", "bench"], run=run, env_info=lambda: ENV,
                        print=lambda *a: None, verify_shards=3)
    assert rc == 1
    shards = sorted(a[a.index("--shard") + 1] for a in seen if "verify" in a)
    assert shards == ["0/3", "1/3", "2/3"]
    (folder,) = tmp_path.glob("gpu-check-*")
    log = (folder / "verify.txt").read_text()
    assert [line for line in log.splitlines() if line.startswith("checks of")] == [
        "checks of 0/3", "checks of 1/3", "checks of 2/3"]
    assert sorted(p.name for p in folder.iterdir()) == ["bench.txt", "summary.json", "verify.txt"]
    steps = json.loads((folder / "summary.json").read_text())["steps"]
    assert [(s["step"], s["rc"]) for s in steps] == [("verify", 1), ("bench", 0)]


def test_mmfuse_verify_shards_split_the_checks_without_overlap(monkeypatch):
    import io
    from types import SimpleNamespace

    import torch

    from mmfuse import cli, verify

    ran = []

    def check(n):
        ok = SimpleNamespace(ok=True, what="out", error=0.0, allowed=1.0)
        return SimpleNamespace(op=f"linear {n}", dtype=torch.float32, shape=f"s{n}",
                               run=lambda dev: ran.append(n) or [ok])

    monkeypatch.setattr(verify, "all_checks", lambda: [check(n) for n in range(10)])
    per_shard = []
    for i in range(3):
        ran.clear()
        out = io.StringIO()
        assert verify.main("cpu", None, out=out, shard=(i, 3)) == 0
        per_shard.append(list(ran))
        assert f"{len(ran)} passed, 0 failed" in out.getvalue()
    assert sorted(sum(per_shard, [])) == list(range(10))  # every check once, in one shard only
    # contiguous runs (a shard compiles its own ops' kernels, not every op's)
    assert per_shard == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError, match="shard"):
        verify.main("cpu", None, out=io.StringIO(), shard=(3, 3))
    with pytest.raises(SystemExit, match="I/N"):
        cli._shard("2-of-4")
    with pytest.raises(SystemExit, match="0 <= I < N"):
        cli._shard("4/4")
    assert cli._shard("1/4") == (1, 4) and cli._shard(None) is None


def test_every_covered_family_has_a_shape_row_or_a_reason():
    # Issue 11 item 5: each family the registry swaps by default names the rows of bench/shapes.py that
    # stand for it, or says why none does; a family added to the registry fails here until someone decides.
    from mmfuse import registry
    from mmfuse.bench import shapes

    families = {f.name for f in registry.FAMILIES if not f.tower}
    assert set(shapes.FAMILY_ROWS) == families
    rows = {s.name for table in (shapes.MLP_SHAPES, shapes.GATED_SHAPES, shapes.MERGED_SHAPES, shapes.PATCH_SHAPES,
                                 shapes.ATTENTION_SHAPES) for s in table}
    for name, entry in shapes.FAMILY_ROWS.items():
        if isinstance(entry, tuple):
            assert entry and set(entry) <= rows, (name, set(entry) - rows)
        else:
            assert entry.startswith("no row"), (name, entry)


def test_gpu_check_archive_packs_every_result_after_each_step(tmp_path):
    """``--archive``: the out-dir packed into one .tar.gz after each step (a step's files are in it even if a
    later step is cut off), the archive itself left out when it lies inside the out-dir."""
    import tarfile

    from mmfuse import gpu_check

    out = tmp_path / "r"
    archive = out / "r.tgz"
    clock = FakeClock()
    seen = []

    class Run(FakeRun):
        def __call__(self, argv, cwd, env, stdout, stderr, timeout):
            if archive.exists():  # what the previous steps left, packed before this one started
                with tarfile.open(archive) as tar:
                    seen.append(sorted(tar.getnames()))
            if "bench" in argv and "verify" not in argv:
                (out / "NVIDIA_H100_80GB_HBM3-2026-11-27.json").write_text("{}")
            return super().__call__(argv, cwd, env, stdout, stderr, timeout)

    rc = gpu_check.main(str(out), budget_s=480, steps=["verify", "bench"], run=Run(clock, seconds=30.0),
                        env_info=lambda: ENV, clock=clock, print=lambda *a: None, verify_shards=1,
                        archive=str(archive))
    assert rc == 0
    folder = next(p.name for p in out.glob("gpu-check-*"))
    assert seen == [[f"r/{folder}/summary.json", f"r/{folder}/verify.txt"]]
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
        assert tar.extractfile(f"r/{folder}/bench.txt").read() == b"bench output\n"
    assert names == ["r/NVIDIA_H100_80GB_HBM3-2026-11-27.json", f"r/{folder}/bench.txt", f"r/{folder}/summary.json",
                     f"r/{folder}/verify.txt"]
    assert not (out / "r.tgz.part").exists()


def test_kernel_profile_pipeline_cases_all_parse():
    """Every form of ``PIPELINE_CASES`` (the GPU run's list) is read and run by the sweep: each shape stood
    in by a tiny one of the same name (interpreted at the interpreter's tiles, a timer that runs once), so a
    malformed entry fails here and not on the one GPU run a session gets."""
    from mmfuse.bench import kernel_profile
    from mmfuse.bench.shapes import ATTENTION_SHAPES, AttentionShape

    tiny = [AttentionShape(s.name, 5, 40, 2 * (s.heads // s.kv_heads), 2, 16) for s in ATTENTION_SHAPES]
    ran = []
    rows = kernel_profile.attention_pipeline_sweep(device="cpu", timer=lambda fn: ran.append(fn()) or 0.5,
                                                   shapes=tiny)
    forms = sum(len(fwd) + len(bwd) + 1 for _, _, fwd, bwd in kernel_profile.PIPELINE_CASES)
    failed = [r for r in rows if "error" in r]
    assert len(rows) == forms == len(ran) and not failed, failed
    assert {r.get("dq_splits") for r in rows} >= {"1x2", "1x4", "1x3"} and {"64x32", "32x64"} <= {
        r.get("dq_tile") for r in rows}


def test_kernel_profile_attention_against_sdpa():
    """Issue 13's table: every shape and batch for mmfuse and SDPA, forward and forward + backward (the
    gradients reached, interpreted on tiny shapes; the timers stand in), and the markdown's ratio column
    is SDPA's device time over mmfuse's."""
    from mmfuse.bench import kernel_profile
    from mmfuse.bench.shapes import AttentionShape

    shapes = [AttentionShape("gqa", 5, 40, 4, 2, 16), AttentionShape("mha", 3, 20, 2, 2, 8)]
    ran = []

    def timer(step):
        out = step()
        ran.append(all(torch.isfinite(t).all() for t in (out if isinstance(out, tuple) else (out,))))
        return 0.5 if len(ran) % 4 else 0.25

    from mmfuse.kernels import _launch

    replays = []

    def wall(step):
        replays.append(_launch.REPLAY)
        step()
        return 2.0

    rows = kernel_profile.attention_against_sdpa(device="cpu", shapes=shapes, batches=(1, 3), timer=timer,
                                                 wall=wall)
    impls = ("mmfuse", "mmfuse, Triton's path", "sdpa")
    assert [(r["shape"], r["batch"], r["impl"]) for r in rows] == [
        (s, b, i) for s in ("gqa", "mha") for b in (1, 3) for i in impls]
    assert all(ran) and len(ran) == 16 and not [r for r in rows if any("error" in k for k in r)]
    # the middle row's calls ran with the replay off (wall time only), every other with it as it was
    assert replays == [True, True, False, False, True, True] * 4 and _launch.REPLAY
    md = kernel_profile.markdown({"gpu": "x", "date": "d", "attention_vs_sdpa": rows})
    assert "| gqa | 1 | mmfuse | 0.5000 | 2.0000 | 0.5000 | 2.0000 | 1.00, 0.50 |" in md
    assert "| gqa | 1 | mmfuse, Triton's path | not timed | 2.0000 | not timed | 2.0000 |  |" in md
    assert "| gqa | 1 | sdpa | 0.5000 | 2.0000 | 0.2500 | 2.0000 |  |" in md
    assert "attention_vs_sdpa" in kernel_profile.PARTS
