"""Every kernel launch: Triton's launch path, without re-binding arguments it has already specialised.

``kernel[grid](*args, **meta)`` (``JITFunction.run``) binds every argument, specialises each one, builds
a cache key and looks up the compiled kernel, on every launch: 21-29 us of host time per launch on this
project's CPU (the attention forward passes 61 arguments), against ~1 us in the launcher itself; replayed,
9-14 us (bench/NOTES.md, "Session 22"). ``launch_kernel`` makes the same lookup with a key of its own:

* per argument, the classes Triton specialises on, never coarser: a tensor's dtype and whether its
  address is a multiple of 16; an int's equality with 1, divisibility by 16 and width (i32, i64, u64);
  a float, a bool or None by kind. Any other argument (a TMA descriptor) takes Triton's path;
* every keyword (constexprs and compile options), the device, and the knobs that enter Triton's options.

That is what Triton's own in-memory key holds (its specialisations and the options it is handed); what
Triton reads only when compiling (the target override, the fp-fusion default) it does not key either.

A key seen before replays the compiled kernel's launcher with the values Triton's path passes it (the
positional arguments, then the constexprs and defaults in parameter order) on the device's current
stream. A new key takes Triton's path, which finds or compiles the kernel, launches it, and returns it to
be kept. Triton's path is also taken under the interpreter, for anything that is not a ``JITFunction``
(the tests' and benchmarks' stand-ins), for a callable grid, and while a launch hook, pre-run hook or
stage-inspection hook is installed (a profiler sees every launch as it would without mmfuse).
Not replayed: Triton's check that the globals a kernel reads are unchanged (mmfuse's are constants).

Contract of every call site, checked on every key's first launch (and on every interpreted launch, so
the test suite checks each site): runtime arguments by position, constexprs by keyword. A constexpr
passed by position would be keyed by its class and replay the wrong kernel; a runtime argument passed by
keyword would be keyed by its value and grow the cache with every new value. Not checked: a compile
option (``num_warps``...) keeps one type per call site (keyed by equality, where Triton's key formats it:
``4.0`` after ``4`` would replay where Triton's path raises).
"""

from __future__ import annotations

import functools
import inspect
import os
import weakref

import torch
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from mmfuse._dispatch import INTERPRET

#: ``MMFUSE_LAUNCH_REPLAY=0`` (read once, at import): every launch takes Triton's own path (benchmarks
#: compare the two; tests check they agree).
_REPLAY_SETTING = os.environ.get("MMFUSE_LAUNCH_REPLAY", "1")
if _REPLAY_SETTING not in ("0", "1"):
    raise ValueError(f"MMFUSE_LAUNCH_REPLAY: expected '0' or '1', got {_REPLAY_SETTING!r}")
REPLAY = _REPLAY_SETTING == "1"

#: Each kernel's replays, kept on the kernel (a ``JITFunction`` hashes by its source's cache key, under a
#: lock): (device, knobs, keywords, argument classes) -> (launcher, function, packed metadata, tail,
#: compiled kernel). The kernels holding some, weakly (a kernel made again goes with its replays), so that
#: ``forget`` can empty them all.
_REPLAYING = weakref.WeakSet()

class _Unkeyed(Exception):
    """An argument of a kind ``launch_kernel`` does not key: the launch takes Triton's path."""


def _wide_int_class(a: int) -> int:
    """An int beyond i32: 2 + whether 16 divides it, + 2 from 2^63 (i64 or u64). Beyond u64 and i64
    Triton's specialiser raises OverflowError, and Triton 3.6's launcher would wrap such a value silently:
    Triton's path takes it."""
    if not -0x8000000000000000 <= a <= 0xFFFFFFFFFFFFFFFF:
        raise _Unkeyed
    return 2 + (a & 15 == 0) + 2 * (a >= 0x8000000000000000)


def _other_class(a):
    if a is None:
        return None
    if a.__class__ is float or a.__class__ is bool:
        return a.__class__
    if isinstance(a, torch.Tensor):  # (a subclass: a Parameter)
        return a.dtype, a.data_ptr() & 15 == 0
    raise _Unkeyed


def _argument_classes(args) -> tuple:
    # One expression per argument, the common kinds first, constants inline: this runs on every launch.
    # An int within i32: -1 for 1 (a constexpr to Triton), else whether 16 divides it.
    return tuple([
        ((-1 if a == 1 else a & 15 == 0) if -0x80000000 <= a <= 0x7FFFFFFF else _wide_int_class(a))
        if a.__class__ is int else
        (a.dtype, a.data_ptr() & 15 == 0) if a.__class__ is torch.Tensor else
        _other_class(a)
        for a in args])


def _hooks_idle() -> bool:
    """No launch hook and no stage-inspection hook installed (an empty ``HookChain`` is Triton's
    default)."""
    rt = knobs.runtime
    return (not getattr(rt.launch_enter_hook, "calls", rt.launch_enter_hook)
            and not getattr(rt.launch_exit_hook, "calls", rt.launch_exit_hook)
            and rt.add_stages_inspection_hook is None)


@functools.lru_cache(maxsize=None)
def _parameters(fn) -> tuple:
    """(name, is constexpr, default) per parameter of the Python function under a kernel."""
    return tuple((p.name, "constexpr" in str(p.annotation), p.default)
                 for p in inspect.signature(fn).parameters.values())


@functools.lru_cache(maxsize=None)
def check_call(fn, positional: int, keywords: tuple) -> None:
    """Raises TypeError unless the first ``positional`` parameters of ``fn`` are runtime parameters
    and every keyword naming a parameter names a constexpr (the contract above)."""
    params = _parameters(fn)
    if positional > len(params):
        raise TypeError(f"{fn.__name__}: expected at most {len(params)} positional arguments, got {positional}")
    for name, constexpr, _ in params[:positional]:
        if constexpr:
            raise TypeError(f"{fn.__name__}: constexpr {name!r} must be passed by keyword, got it by position")
    runtime = {name for name, constexpr, _ in params if not constexpr}
    for name in keywords:
        if name in runtime:
            raise TypeError(f"{fn.__name__}: runtime argument {name!r} must be passed by position, got it by keyword")


def _tail(fn, positional: int, meta: dict) -> tuple:
    """The values Triton's path passes the launcher after the positional ones: each later parameter's
    keyword value, else its default."""
    return tuple(meta[name] if name in meta else default for name, _, default in _parameters(fn)[positional:])


def launch_kernel(kernel, grid, *args, **meta):
    """``kernel[grid](*args, **meta)``, the compiled kernel found by ``launch_kernel``'s own key after
    its first launch (module docstring). Returns what Triton's path returns (the compiled kernel on a
    GPU launch)."""
    if INTERPRET or not REPLAY or kernel.__class__ is not JITFunction or callable(grid) or kernel.pre_run_hooks \
            or not _hooks_idle():
        if INTERPRET and hasattr(kernel, "fn"):
            check_call(kernel.fn, len(args), tuple(meta))
        return kernel[grid](*args, **meta)
    try:
        classes = _argument_classes(args)
    except _Unkeyed:
        return kernel[grid](*args, **meta)
    dev = driver.active
    device = dev.get_current_device()
    rt, comp = knobs.runtime, knobs.compilation
    key = (device, rt.debug, comp.instrumentation_mode, getattr(comp, "fpsan_homomorphic_casts", None),
           tuple(meta.items()), classes)
    replays = kernel.__dict__.get("_mmfuse_replays")
    if replays is None:
        replays = kernel._mmfuse_replays = {}
        _REPLAYING.add(kernel)
    entry = replays.get(key)
    if entry is None:
        check_call(kernel.fn, len(args), tuple(meta))
        compiled = kernel[grid](*args, **meta)
        if compiled is not None:  # (None: a ``jit_cache_hook`` skipped the compile; nothing launched)
            replays[key] = (compiled.run, compiled.function, compiled.packed_metadata,
                            _tail(kernel.fn, len(args), meta), compiled)
        return compiled
    run, function, packed, tail, compiled = entry
    n = len(grid)
    run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, dev.get_current_stream(device), function, packed,
        None, None, None, *args, *tail)
    return compiled


def forget() -> None:
    """Drops every kept replay: each key's next launch takes Triton's path again."""
    for kernel in list(_REPLAYING):
        kernel._mmfuse_replays.clear()
