"""Dispatch and the mmfuse command (verify), including its exit codes."""

import io
import os
import subprocess
import sys

import torch

import mmfuse
from mmfuse import verify
from mmfuse.testing import Comparison


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MMFUSE_CLI_REEXEC")}
    env.update(extra)
    return env


def test_backend_under_tests_is_the_interpreter():
    assert mmfuse.backend_for(torch.zeros(1)) == mmfuse.INTERPRETER
    assert mmfuse.backend_for(None, torch.zeros(1)) == mmfuse.INTERPRETER
    assert mmfuse.backend_for(torch.zeros(1, device="meta")) == mmfuse.REFERENCE


def test_cpu_without_interpreter_uses_the_reference():
    code = (
        "import torch, mmfuse\n"
        "x = torch.randn(4, 8); w = torch.randn(3, 8)\n"
        "assert mmfuse.backend_for(x) == 'reference', mmfuse.backend_for(x)\n"
        "assert torch.equal(mmfuse.linear(x, w, None, 'gelu'), torch.nn.functional.gelu(x @ w.t()))\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_verify_table_and_exit_code_zero():
    out = io.StringIO()
    rc = verify.main("cpu", ["linear"], out=out)
    text = out.getvalue()
    assert rc == 0, text
    assert "backend 'interpreter'" in text
    assert "linear gelu" in text and "grad weight" in text and "FAIL" not in text


def test_verify_exit_code_nonzero_on_failure(monkeypatch):
    failing = verify.Check("fake op", torch.float32, "M=1", lambda dev: [Comparison("out", 1.0, 0.0, 0.5)])
    crashing = verify.Check("fake crash", torch.float32, "M=1", lambda dev: 1 / 0)
    monkeypatch.setattr(verify, "all_checks", lambda: [failing, crashing])
    out = io.StringIO()
    assert verify.main("cpu", out=out) == 1
    assert "FAIL" in out.getvalue() and "ZeroDivisionError" in out.getvalue()
    assert "0 passed, 2 failed" in out.getvalue()


def test_mmfuse_command_turns_the_interpreter_on_itself():
    # Started without TRITON_INTERPRET, as a user would: it must re-execute with the interpreter on.
    r = subprocess.run([sys.executable, "-m", "mmfuse.cli", "verify", "--op", "mlp"], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backend 'interpreter'" in r.stdout
    assert "mlp gelu" in r.stdout and " passed, 0 failed" in r.stdout


def test_mmfuse_command_unknown_op_fails():
    r = subprocess.run([sys.executable, "-m", "mmfuse.cli", "verify", "--op", "nonesuch"], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "no checks match" in r.stdout
