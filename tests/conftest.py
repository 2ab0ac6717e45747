"""Test setup: the kernels run through Triton's interpreter on CPU.

TRITON_INTERPRET must be set before ``@triton.jit`` decorates anything, so it is set here, before
any test module imports mmfuse.

``MMFUSE_TEST_DEVICE=cuda`` (what ``mmfuse gpu-check`` sets) runs the same tests on a GPU instead: the
interpreter stays off, tensors are created on the GPU by default (``torch.set_default_device``), and
tests that need the interpreter (launch counting) skip themselves.
"""

import os
import sys

# Test helper modules beside this file (``_transformers_versions``): --import-mode=importlib does not
# put the test directory on sys.path.
sys.path.insert(0, os.path.dirname(__file__))

DEVICE = os.environ.get("MMFUSE_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# The compile check in the suite: sm_90 (the H100 the project is tuned for), for CI time (~200 cold
# compiles, ~50 s of CI); sm_80 as well with MMFUSE_AOT_ARCHS=80,90 (README, "Compile check").
os.environ.setdefault("MMFUSE_AOT_ARCHS", "90")

import pytest  # noqa: E402
import torch  # noqa: E402

import mmfuse  # noqa: E402
from mmfuse.testing import poisoned_outputs  # noqa: E402

if DEVICE == "cpu":
    assert mmfuse.INTERPRET, "mmfuse was imported before conftest set TRITON_INTERPRET"
    torch.set_num_threads(1)  # pytest-xdist runs one worker per core
else:
    torch.set_default_device(DEVICE)


@pytest.fixture(autouse=True)
def _poison_and_seed():
    """Every launcher-allocated buffer starts as NaN; every test starts from a fixed seed."""
    torch.manual_seed(0)
    with poisoned_outputs():
        yield


@pytest.fixture
def launches(monkeypatch):
    """Names of the Triton kernels launched (interpreter grid calls), in order."""
    if not mmfuse.INTERPRET:
        pytest.skip("launches are counted through Triton's interpreter (MMFUSE_TEST_DEVICE=cpu)")
    from triton.runtime import interpreter

    names = []
    real = interpreter.GridExecutor.__call__

    def counting(self, *args, **kwargs):
        names.append(self.fn.__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", counting)
    return names
