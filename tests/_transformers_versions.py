"""The tests against a transformers other than the pinned one (CI runs the model tests again on the
last 4.x release: ``.ci/run`` step 2b).

The pinned version (``pyproject.toml``'s test extra) is where everything is checked: the enumeration,
the counts, the README, every family. On another version the same family tests run for every class it
has, and a test skips (never passes) only where its own scaffolding does not fit that version: a class
or config the version lacks, a tiny config its config classes reject, a call convention its class does
not take; and a class mmfuse's own version check leaves alone ("another transformers version's class").
What ``mmfuse.patch`` then does is still checked: swapped and equal to the original; any other reason to
leave a class alone fails.
"""

from __future__ import annotations

import functools
import importlib
import pathlib
import re
import types

import pytest


@functools.lru_cache(maxsize=None)
def pinned() -> str:
    text = (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text()
    return re.search(r'"transformers==([^"]+)"', text).group(1)


def installed() -> str:
    import transformers

    return transformers.__version__


def on_pinned() -> bool:
    return installed() == pinned()


def skip_off_pin(why: str) -> None:
    """Skip with ``why`` on another transformers; on the pinned one there is nothing to excuse."""
    if on_pinned():
        raise AssertionError(f"on the pinned transformers {pinned()}: {why}")
    pytest.skip(f"transformers {installed()}: {why}")


def off_pin_skip_on_error(run, what: str):
    """``run()``; off the pin, an exception from the test's own scaffolding (``what``: building a tiny
    module from a config, calling the original class the test's way) skips instead of failing."""
    if on_pinned():
        return run()
    try:
        return run()
    except pytest.skip.Exception:
        raise
    except Exception as e:  # noqa: BLE001 (any failure of the scaffolding, named in the skip)
        pytest.skip(f"transformers {installed()}: {what} fails ({type(e).__name__}: {str(e)[:160]})")


def eager_attention_when_unset() -> None:
    """transformers 4.x: a config built directly (not through a model's ``from_config``) has no
    attention implementation, and a module built from it fails to look ``None`` up; 5.x defaults to
    eager. The tests build modules from bare configs, so off the pin they read unset as eager."""
    from transformers import PretrainedConfig

    prop = PretrainedConfig.__dict__.get("_attn_implementation")
    if not isinstance(prop, property) or getattr(prop.fget, "_eager_when_unset", False):
        return

    def get(self):
        return prop.fget(self) or "eager"

    get._eager_when_unset = True
    PretrainedConfig._attn_implementation = property(get, prop.fset)


def merged_output(out):
    """A Qwen-VL-style vision tower's merged tokens: 5.x returns them as ``pooler_output``, 4.x as the
    output itself."""
    return getattr(out, "pooler_output", out)


def pinned_only(test):
    """For what only the pinned version answers: the enumeration, the counts, the README's table."""
    return pytest.mark.skipif(not on_pinned(), reason=f"checked against the pinned transformers {pinned()}")(test)


class _Missing:
    """What the installed transformers lacks: fine to name in a table, a skip (off the pin) to use."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        skip_off_pin(f"no {self._name}")


class Models:
    """``transformers.models`` whose missing modules and classes are ``_Missing`` placeholders, and
    whose packages also answer with their configuration / modeling modules' names (4.x exported fewer
    of them at package level)."""

    def __init__(self, module=None):
        if module is None:
            import transformers

            module = transformers.models
        self._module = module

    def __getattr__(self, attr):
        try:
            value = getattr(self._module, attr)
        except (AttributeError, ImportError, RuntimeError):
            value = self._from_submodules(attr)
        return Models(value) if isinstance(value, types.ModuleType) else value

    def _from_submodules(self, attr):
        name = self._module.__name__
        short = name.rsplit(".", 1)[-1]
        for prefix in ("configuration_", "modeling_"):
            try:
                return getattr(importlib.import_module(f"{name}.{prefix}{short}"), attr)
            except (AttributeError, ImportError):
                pass
        return _Missing(f"{name}.{attr}")
