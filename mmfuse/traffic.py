"""Memory traffic of the kernels: a tile-by-tile model, and a probe that measures an interpreted run.

``fused_gemm_traffic`` counts what ``fused_gemm_kernel`` loads and stores, program by program, as the
launcher runs it: every program loads BLOCK_M rows of A and BLOCK_N columns of B over all of K (rows
and columns past the edge wrap around and are re-read; the K tail is masked), the bias once per
program row, the aux tile in the MLP backward, and stores its masked C tile (and aux).
``loaded`` is the total bytes requested by loads (what L2 serves); ``unique`` the distinct bytes
(what HBM must deliver at least once: the HBM figure under the assumption that re-reads hit L2).

The same kind of count exists for every other kernel: ``act_grad_traffic``,
``patch_embed_fwd_traffic`` / ``patch_embed_bwd_traffic`` and ``attention_fwd_traffic`` /
``attention_bwd_traffic``; ``mlp_traffic`` assembles a whole MLP training step against eager.

``measure`` runs a function under Triton's interpreter while recording every address loaded and
stored (per launch if asked), and attributes them to the tensors given: the tests check every model
against it at odd sizes, operand by operand.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch


@dataclasses.dataclass
class Traffic:
    loaded: int = 0   # bytes requested by loads, re-reads included
    unique: int = 0   # distinct bytes loaded
    stored: int = 0   # bytes stored

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.loaded + other.loaded, self.unique + other.unique, self.stored + other.stored)


def _totals(ts) -> dict:
    """mmfuse's launches: HBM = each launch's distinct bytes plus its stores, L2 = every load and store."""
    return {"hbm": sum(t.unique + t.stored for t in ts), "l2": sum(t.loaded + t.stored for t in ts),
            "launches": len(ts)}


def _eager_totals(launches) -> dict:
    """Eager's kernels, each as (bytes read, bytes written)."""
    return {"hbm": sum(r + w for r, w in launches), "launches": len(launches)}


def _cdiv(a, b):
    return -(-a // b)


def fused_gemm_traffic(M: int, N: int, K: int, tile: tuple[int, int], elem: int, *, bias: bool = False,
                       store_aux: bool = False, act_grad: bool = False, gated: bool = False,
                       gate_grad: bool = False, two_k: bool = False) -> dict[str, Traffic]:
    """Per operand ("a", "b", "bias", "aux", "c"; the gated MLP's "a2", "b2", "bias2", "aux2", "c2") of
    one ``fused_gemm_kernel`` launch. ``gated``: a second B (the up weight) read like B, its bias, and
    the up pre-activation stored beside the gate's; ``gate_grad``: g and u read once, dG and dU stored;
    ``two_k``: a second (A, B) pair over another K of the same length."""
    bm, bn = tile
    pm, pn = _cdiv(M, bm), _cdiv(N, bn)
    t = {
        "a": Traffic(loaded=pm * pn * bm * K * elem, unique=min(M, pm * bm) * K * elem),
        "b": Traffic(loaded=pm * pn * bn * K * elem, unique=min(N, pn * bn) * K * elem),
        "c": Traffic(stored=M * N * elem),
    }
    if gated or two_k:
        t["b2"] = t["b"]
    if two_k:
        t["a2"] = t["a"]
    if bias:
        t["bias"] = Traffic(loaded=pm * N * elem, unique=N * elem)
        if gated:
            t["bias2"] = t["bias"]
    once = Traffic(loaded=M * N * elem, unique=M * N * elem)
    if store_aux or act_grad:
        t["aux"] = once if act_grad else Traffic(stored=M * N * elem)
        if gated:
            t["aux2"] = t["aux"]
    if gate_grad:
        t["aux"] = t["aux2"] = once
        t["c2"] = t["c"]
    return t


def bias_grad_traffic(M: int, N: int, elem: int) -> Traffic:
    """db = the column sums of dH (M, N): one reduction reading dH once, writing N values (and the
    cast of its fp32 sums: N more)."""
    return Traffic(loaded=M * N * elem, unique=M * N * elem, stored=N * (4 + elem))


def act_grad_traffic(M: int, N: int, elem: int) -> dict[str, Traffic]:
    """``act_grad_kernel`` (the backward of one ``mmfuse.linear`` with an activation): dY and h read
    once, dH written once; its masks keep every access inside the (M, N) tensors."""
    once = Traffic(loaded=M * N * elem, unique=M * N * elem)
    return {"dy": once, "h": once, "dh": Traffic(stored=M * N * elem)}


def linear_traffic(M: int, K: int, N: int, tile: tuple[int, int], elem: int, *, bias: bool = True,
                   activation: bool = True, training: bool = True) -> dict[str, Traffic]:
    """Forward of ``mmfuse.linear`` (one launch), by tensor: x, weight, bias, y, h."""
    g = fused_gemm_traffic(M, N, K, tile, elem, bias=bias, store_aux=activation and training)
    out = {"x": g["a"], "weight": g["b"], "y": g["c"]}
    if bias:
        out["bias"] = g["bias"]
    if "aux" in g:
        out["h"] = g["aux"]
    return out


def patch_embed_fwd_traffic(B: int, C: int, H: int, W: int, P: int, D: int, tile: tuple[int, int, int], elem: int,
                            *, T: int = 1, F: int = 1, bias: bool = True, pos_batched: bool | None = False
                            ) -> dict[str, Traffic]:
    """Per operand ("pixels", "weight" = the packed weight, "bias", "pos", "out") of one
    ``patch_embed_fwd_kernel`` launch: each program gathers BLOCK_M patches (rows past M wrap) over
    the whole reduction, of which only the P real pixels of each RUN = next_pow2(P) run are loaded,
    and BLOCK_N packed weight rows over K rounded up to BLOCK_K (unmasked; columns past D wrap).
    ``pos_batched``: None = no pos_embed, False = one (N, D) table broadcast over the batch."""
    bm, bn, bk = tile
    run = 1 << (P - 1).bit_length()
    tokens = (F // T) * (H // P) * (W // P)
    M, pixels_per_patch = B * tokens, C * T * P * P
    k_loop = _cdiv(C * T * P * run, bk) * bk
    pm, pn = _cdiv(M, bm), _cdiv(D, bn)
    t = {
        "pixels": Traffic(loaded=pm * pn * bm * pixels_per_patch * elem,
                          unique=min(M, pm * bm) * pixels_per_patch * elem),
        "weight": Traffic(loaded=pm * pn * bn * k_loop * elem, unique=min(D, pn * bn) * k_loop * elem),
        "out": Traffic(stored=M * D * elem),
    }
    if bias:
        t["bias"] = Traffic(loaded=pm * D * elem, unique=D * elem)
    if pos_batched is not None:
        t["pos"] = Traffic(loaded=M * D * elem, unique=(M if pos_batched else tokens) * D * elem)
    return t


def patch_embed_bwd_traffic(B: int, C: int, H: int, W: int, P: int, D: int, tiles: dict, elem: int, *,
                            T: int = 1, F: int = 1, bias: bool = True, pos: bool = True, dw_splits: int = 1,
                            batch_rows: int = 32) -> dict[str, dict[str, Traffic]]:
    """Per launch of the patch-embedding backward (every input requiring grad, pos_embed one (N, D)
    table broadcast over the batch), per tensor:

    * "dx" (``patch_embed_dx_kernel``, tile ``tiles["dx"]`` = (BLOCK_M, BLOCK_N, BLOCK_K)): BLOCK_M
      rows of dOut over all of D (rows past M wrap) and BLOCK_N columns of the packed weight (run
      order, no mask: columns up to the tile edge, inside the 128-column padding); stores every
      pixel's gradient once (the run padding j >= P is not stored).
    * "dw" (``patch_embed_dw_kernel``, ``tiles["dw"]``): BLOCK_M of D (wrapping) x every token of
      dOut^T, and every token's patch at BLOCK_N columns of the run order (C*T*P*RUN; masked past
      it, not wrapped), of which the real pixels (j < P) are loaded: every pixel once per row block;
      stores dW.
      Split over tokens (``dw_splits`` > 1): the same loads, stores of fp32 partials
      ("weight_grad_partial" S x D x K), and "dw_combine" (``dw_combine_kernel``) reads them once and
      writes dW.
    * "batch_sum" (``batch_sum_kernel``, ``batch_rows`` = its BLOCK_N): reads dOut once, writes dpos
      (N, D) and, with a bias, its blocks' fp32 column sums ("bias_grad_partial", cdiv(N, batch_rows) x D).
    * "bias_sum" (with a bias; a torch reduction, not a Triton launch): db from those column sums
      (read once, fp32 sum and its cast written), or without pos from dOut itself (``bias_grad_traffic``)."""
    run = 1 << (P - 1).bit_length()
    tokens = (F // T) * (H // P) * (W // P)
    M, K, k_runs = B * tokens, C * T * P * P, C * T * P * run
    bm, bn, _ = tiles["dx"]
    pm, pn = _cdiv(M, bm), _cdiv(k_runs, bn)
    dx = {"dout": Traffic(loaded=pm * pn * bm * D * elem, unique=M * D * elem),
          "weight": Traffic(loaded=pm * pn * D * bn * elem, unique=D * pn * bn * elem),
          "pixels_grad": Traffic(stored=M * K * elem)}
    bm, bn, _ = tiles["dw"]
    pm, pn = _cdiv(D, bm), _cdiv(k_runs, bn)
    dw = {"dout": Traffic(loaded=pm * pn * bm * M * elem, unique=D * M * elem),
          "pixels": Traffic(loaded=pm * M * K * elem, unique=M * K * elem)}
    out = {"dx": dx, "dw": dw}
    if dw_splits > 1:
        S = dw_splits
        dw["weight_grad_partial"] = Traffic(stored=S * D * K * 4)
        out["dw_combine"] = {"weight_grad_partial": Traffic(loaded=S * D * K * 4, unique=S * D * K * 4),
                             "weight_grad": Traffic(stored=D * K * elem)}
    else:
        dw["weight_grad"] = Traffic(stored=D * K * elem)
    if pos:
        out["batch_sum"] = {"dout": Traffic(loaded=M * D * elem, unique=M * D * elem),
                            "pos_grad": Traffic(stored=tokens * D * elem)}
        if bias:
            partial = _cdiv(tokens, batch_rows) * D * 4
            out["batch_sum"]["bias_grad_partial"] = Traffic(stored=partial)
            out["bias_sum"] = {"bias_grad": Traffic(loaded=partial, unique=partial, stored=D * (4 + elem))}
    elif bias:
        out["bias_sum"] = {"bias_grad": bias_grad_traffic(M, D, elem)}
    return out


def attention_fwd_traffic(B: int, Bq: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int, blocks: tuple[int, int],
                          splits: int, elem: int, acc_elem: int = 4) -> dict[str, Traffic]:
    """Per tensor of ``attention_fwd`` without kv_lens / key_mask: ``attn_fwd_kernel`` (grid: query
    blocks x B*Hq x splits; each program loads its query block and every key and value of its chunk)
    and, with more than one split, ``attn_combine_kernel`` (reads the fp32 partials, the partial
    log-sum-exps twice, writes o and lse). "o_partial" / "lse_partial": the split buffers."""
    bm, bn = blocks
    key_blocks = max(1, _cdiv(Lk, bn))
    chunk = _cdiv(key_blocks, max(1, min(splits, key_blocks))) * bn
    splits = _cdiv(max(Lk, 1), chunk)
    qm = _cdiv(Lq, bm)
    rows = B * Hq * Lq
    kv = Traffic(loaded=qm * B * Hq * Lk * D * elem, unique=B * Hkv * Lk * D * elem)
    t = {"q": Traffic(loaded=splits * rows * D * elem, unique=Bq * Hq * Lq * D * elem), "k": kv, "v": kv,
         "o": Traffic(stored=rows * D * elem), "lse": Traffic(stored=rows * acc_elem)}
    if splits > 1:
        t["o_partial"] = Traffic(loaded=splits * rows * D * acc_elem, unique=splits * rows * D * acc_elem,
                                 stored=splits * rows * D * acc_elem)
        t["lse_partial"] = Traffic(loaded=2 * splits * rows * acc_elem, unique=splits * rows * acc_elem,
                                   stored=splits * rows * acc_elem)
    return t


def attention_bwd_traffic(B: int, Bq: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int, blocks: tuple[int, int],
                          elem: int, acc_elem: int = 4, dq_splits: int = 1, dq_key_splits: int = 1,
                          single_pass: bool = False) -> dict[str, dict[str, Traffic]]:
    """Per launch of ``attention_bwd`` (dq, dk and dv all needed, no kv_lens / key_mask), per tensor:

    * "delta" (``attn_delta_kernel``): reads o and dO once, writes delta (fp32 per row).
    * "dkdv" (``attn_bwd_dkdv_kernel``, one program per key block x batch x kv head): loads its K and
      V block once, then for each of the GROUP query heads every query block of q, dO, lse and delta;
      stores dK, dV.
    * "dq" (``attn_bwd_dq_kernel``, one program per query block x query batch x head x split): loads
      its q block once, then for each sample of its share of the batch (shared queries) dO, lse,
      delta and every key and value of that sample's kv head; stores dQ, or with ``dq_splits`` > 1
      an fp32 partial per split ("dq_partial"); with ``dq_key_splits`` > 1 each (batch share, key
      chunk) is a split, loading its q block, and dO, lse, delta once per key chunk; the partials
    * "dq_sum" (a torch reduction, not a Triton launch) reads back and sums into dQ.
    ``single_pass`` (Hq = Hkv, every query in one block): "dq" alone does the whole backward, also
    loading o (for delta; no "delta" launch) and storing dK, dV, and there is no "dkdv" launch.
    ``blocks`` = (BLOCK_M, BLOCK_N) of the backward."""
    bm, bn = blocks
    rows = B * Hq * Lq
    qm, kb = _cdiv(Lq, bm), _cdiv(Lk, bn)
    kv = B * Hkv * Lk * D * elem
    q_elems = Bq * Hq * Lq * D
    q_unique = q_elems * elem
    row_d, row_acc = rows * D * elem, rows * acc_elem
    batch_loop = B if Bq == 1 else 1
    splits = _cdiv(batch_loop, _cdiv(batch_loop, max(1, min(dq_splits, batch_loop))))
    ks = _cdiv(kb, _cdiv(kb, max(1, min(dq_key_splits, kb))))
    splits *= ks
    delta = {"o": Traffic(row_d, row_d), "do": Traffic(row_d, row_d), "delta": Traffic(stored=row_acc)}
    dkdv = {"q": Traffic(loaded=kb * row_d, unique=q_unique), "do": Traffic(loaded=kb * row_d, unique=row_d),
            "lse": Traffic(loaded=kb * row_acc, unique=row_acc), "delta": Traffic(loaded=kb * row_acc, unique=row_acc),
            "k": Traffic(kv, kv), "v": Traffic(kv, kv), "dk": Traffic(stored=kv), "dv": Traffic(stored=kv)}
    kv_loaded = qm * B * Hq * Lk * D * elem
    dq = {"q": Traffic(splits * q_unique, q_unique), "do": Traffic(ks * row_d, row_d),
          "lse": Traffic(ks * row_acc, row_acc), "delta": Traffic(ks * row_acc, row_acc), "k": Traffic(kv_loaded, kv),
          "v": Traffic(kv_loaded, kv)}
    out = {"delta": delta, "dkdv": dkdv, "dq": dq}
    if single_pass:
        if Hq != Hkv or qm != 1:
            raise ValueError(f"attention_bwd_traffic: single_pass needs Hq == Hkv and Lq <= BLOCK_M; got Hq={Hq}, "
                             f"Hkv={Hkv}, Lq={Lq}, BLOCK_M={bm}")
        del dq["delta"]
        dq.update(o=Traffic(ks * row_d, row_d), dk=Traffic(stored=kv), dv=Traffic(stored=kv))
        out = {"dq": dq}
    if splits == 1:
        dq["dq"] = Traffic(stored=q_unique)
    else:
        partial = splits * q_elems * acc_elem
        dq["dq_partial"] = Traffic(stored=partial)
        out["dq_sum"] = {"dq_partial": Traffic(partial, partial), "dq": Traffic(stored=q_unique)}
    return out


class _Recorder:
    def __init__(self):
        self.launches: list[str] = []   # kernel names, in launch order
        self.loads: list = []           # (launch index, addresses, itemsize)
        self.stores: list = []


@contextlib.contextmanager
def _recording():
    import numpy as np
    from triton.runtime import interpreter as interp

    rec = _Recorder()
    cls, grid = interp.InterpreterBuilder, interp.GridExecutor
    load, store, call = cls.create_masked_load, cls.create_masked_store, grid.__call__

    # (The hooks pass Triton's cache / eviction / volatile arguments through as they come, by position or
    # by keyword (a TMA descriptor's load names them): Triton 3.6-3.8 take cache_modifier and
    # eviction_policy where 3.9 takes one cache_policy.)
    def masked_load(self, ptrs, mask, other, *policy, **named):
        out = load(self, ptrs, mask, other, *policy, **named)
        addrs = np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)].ravel()
        rec.loads.append((len(rec.launches) - 1, addrs, out.data.itemsize))
        return out

    def masked_store(self, ptrs, value, mask, *policy, **named):
        addrs = np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)].ravel()
        rec.stores.append((len(rec.launches) - 1, addrs, value.data.itemsize))
        return store(self, ptrs, value, mask, *policy, **named)

    def launch(self, *args, **kwargs):
        rec.launches.append(self.fn.__name__)
        return call(self, *args, **kwargs)

    cls.create_masked_load, cls.create_masked_store, grid.__call__ = masked_load, masked_store, launch
    try:
        yield rec
    finally:
        cls.create_masked_load, cls.create_masked_store, grid.__call__ = load, store, call


def _attribute(rec, named: dict, launch: int | None) -> dict[str, Traffic]:
    """Bytes of the recorded accesses (of one launch, or all) that fall inside each tensor's storage."""
    import numpy as np

    traffic = {}
    for name, t in named.items():
        lo = t.untyped_storage().data_ptr()
        hi = lo + t.untyped_storage().nbytes()
        tr = Traffic()
        seen = []
        for i, addrs, size in rec.loads:
            if launch is None or i == launch:
                inside = addrs[(addrs >= lo) & (addrs < hi)]
                tr.loaded += inside.size * size
                seen.append(inside)
        if seen:
            tr.unique = np.unique(np.concatenate(seen)).size * t.element_size()
        tr.stored = sum(int(((a >= lo) & (a < hi)).sum()) * size for i, a, size in rec.stores
                        if launch is None or i == launch)
        traffic[name] = tr
    return traffic


def measure(fn, tensors: dict[str, torch.Tensor], by_launch: bool = False):
    """Run ``fn()`` under the interpreter; returns (fn's result, {name: Traffic}) for the named
    tensors (a callable value is evaluated after the run, for outputs the run allocates). With
    ``by_launch``, the traffic is split per launch: {kernel name: {name: Traffic}} (tensors a launch
    does not touch get zeros; a kernel launched twice is an error: name its launches apart)."""
    from mmfuse._dispatch import INTERPRET

    if not INTERPRET:
        raise RuntimeError("measure: expected the Triton interpreter on (TRITON_INTERPRET=1 before import)")
    with _recording() as rec:
        result = fn()
    named = {name: (t(result) if callable(t) else t) for name, t in tensors.items()}
    if not by_launch:
        return result, _attribute(rec, named, None)
    if len(set(rec.launches)) != len(rec.launches):
        raise ValueError(f"measure: a kernel was launched more than once: {rec.launches}")
    return result, {kernel: _attribute(rec, named, i) for i, kernel in enumerate(rec.launches)}


def mlp_traffic(M: int, widths, tile, elem: int, bias: bool = True) -> dict[str, dict]:
    """``mmfuse.mlp`` in training (biases on unless ``bias`` is False, GELU between layers), forward and backward, against
    eager PyTorch (addmm with bias, GELU, autograd), each as {"hbm": bytes, "l2": bytes, "launches": n}.
    mmfuse's HBM is the sum of each launch's distinct bytes (re-reads assumed to hit L2); eager's
    kernels are counted the same way: every input read once, every output written once.
    ``eager_elementwise_hbm``: the part of eager's bytes moved by its kernels without a GEMM (GELU,
    GELU', the bias-gradient reduction), which run at bandwidth and cannot hide behind a GEMM.
    ``per_launch``: {"fwd" | "bwd" | "eager_fwd" | "eager_bwd": [{"flops", "hbm", "rows", "cols"}]},
    one entry per kernel in launch order (rows x cols: the GEMM's output, None for GEMM-free kernels).
    ``tile``: (BLOCK_M, BLOCK_N) for every GEMM, or a function (rows, cols) -> (BLOCK_M, BLOCK_N)."""
    layers = list(zip(widths[:-1], widths[1:]))
    n = len(layers)
    tile_for = tile if callable(tile) else (lambda rows, cols: tile)
    detail = {"fwd": [], "bwd": [], "eager_fwd": [], "eager_bwd": []}

    def launch(step, flops, **kw):
        t = sum(fused_gemm_traffic(**kw, tile=tile_for(kw["M"], kw["N"]), elem=elem).values(), Traffic())
        detail[step].append({"flops": flops, "hbm": t.unique + t.stored, "rows": kw["M"], "cols": kw["N"]})
        return t

    def eager(step, flops, hbm, gemm=None):
        detail[step].append({"flops": flops, "hbm": hbm, "rows": gemm and gemm[0], "cols": gemm and gemm[1]})
        return hbm

    e = elem
    fwd, bwd = [], []
    eager_fwd = eager_bwd = elementwise = 0
    for i, (k, nn_) in enumerate(layers):
        fwd.append(launch("fwd", 2 * M * k * nn_, M=M, N=nn_, K=k, bias=bias, store_aux=i < n - 1))
        eager_fwd += eager("eager_fwd", 2 * M * k * nn_, (M * k + nn_ * k + bias * nn_ + M * nn_) * e, (M, nn_))  # addmm
        if i < n - 1:
            eager_fwd += eager("eager_fwd", 0, 2 * M * nn_ * e)          # GELU: read h, write a
            elementwise += 2 * M * nn_ * e
    for i in reversed(range(n)):
        k, nn_ = layers[i]
        bwd.append(launch("bwd", 2 * M * k * nn_, M=nn_, N=k, K=M))                 # dW_i
        if bias:
            db = bias_grad_traffic(M, nn_, e)                                       # db_i (a reduction)
            detail["bwd"].append({"flops": 0, "hbm": db.unique + db.stored, "rows": None, "cols": None})
            bwd.append(db)
        bwd.append(launch("bwd", 2 * M * k * nn_, M=M, N=k, K=nn_, act_grad=i > 0))  # dX (x GELU'(h_{i-1}))
        eager_bwd += eager("eager_bwd", 2 * M * k * nn_, (M * nn_ + M * k + nn_ * k) * e, (nn_, k))  # dW = dY^T X
        if bias:
            eager_bwd += eager("eager_bwd", 0, (M * nn_ + nn_) * e)                              # db = sum dY
            elementwise += (M * nn_ + nn_) * e
        eager_bwd += eager("eager_bwd", 2 * M * k * nn_, (M * nn_ + nn_ * k + M * k) * e, (M, k))  # dX = dY W
        if i > 0:
            eager_bwd += eager("eager_bwd", 0, 3 * M * k * e)           # GELU': read dA and h, write dH
            elementwise += 3 * M * k * e
    return {"fwd": _totals(fwd), "bwd": _totals(bwd),
            "eager_fwd": {"hbm": eager_fwd, "launches": len(detail["eager_fwd"])},
            "eager_bwd": {"hbm": eager_bwd, "launches": len(detail["eager_bwd"])},
            "eager_elementwise_hbm": elementwise,  # of eager's fwd+bwd bytes, those of its GEMM-free kernels
            "per_launch": detail}


def gated_mlp_traffic(M: int, K: int, N: int, D: int, tile, elem: int, bias: bool = True) -> dict[str, dict]:
    """``mmfuse.gated_mlp`` in training (x (M, K), gate / up (N, K), down (D, N)), forward and backward,
    against eager PyTorch running transformers' ``down(act(gate(x)) * up(x))`` (addmm / mm per Linear,
    the activation, the product, autograd), in the form of ``mlp_traffic``. mmfuse: forward = the gated
    GEMM (x read once for both products; g and u saved) + down; backward = dW_down, db_down, [dG | dU]
    (dY @ W_down with the product's backward in its epilogue), [dW_gate; dW_up] (one GEMM), their
    biases (one reduction), dX over both sources. Eager's backward: down's dW, db, dH; the product's
    two halves (dA = dH * u, dU = dH * a); act' (dG); each Linear's dW, db, dX; dX_gate + dX_up.
    ``tile``: (BLOCK_M, BLOCK_N), or a function (rows, cols, kind) -> (BLOCK_M, BLOCK_N), kind being
    "gated", "gate_grad", "two_k" (the gated GEMMs) or None; ``per_launch`` entries carry that kind."""
    tile_for = tile if callable(tile) else (lambda rows, cols, kind=None: tile)
    e = elem
    b = 1 if bias else 0
    detail = {"fwd": [], "bwd": [], "eager_fwd": [], "eager_bwd": []}
    ours = {"fwd": [], "bwd": []}

    def launch(step, flops, **kw):
        kind = "gated" if kw.get("gated") else "gate_grad" if kw.get("gate_grad") else "two_k" if kw.get("two_k") \
            else None
        t = sum(fused_gemm_traffic(**kw, tile=tile_for(kw["M"], kw["N"], kind), elem=e).values(), Traffic())
        detail[step].append({"flops": flops, "hbm": t.unique + t.stored, "rows": kw["M"], "cols": kw["N"],
                             "kind": kind})
        ours[step].append(t)

    def reduction(step, rows, cols):
        t = bias_grad_traffic(rows, cols, e)
        detail[step].append({"flops": 0, "hbm": t.unique + t.stored, "rows": None, "cols": None})
        ours[step].append(t)

    def eager(step, flops, hbm, gemm=None):
        detail[step].append({"flops": flops, "hbm": hbm, "rows": gemm and gemm[0], "cols": gemm and gemm[1]})

    up, down = 2 * M * K * N, 2 * M * N * D
    launch("fwd", 2 * up, M=M, N=N, K=K, bias=bias, store_aux=True, gated=True)
    launch("fwd", down, M=M, N=D, K=N, bias=bias)
    launch("bwd", down, M=D, N=N, K=M)                      # dW_down = dY^T H
    if bias:
        reduction("bwd", M, D)                              # db_down
    launch("bwd", down, M=M, N=N, K=D, gate_grad=True)      # [dG | dU] = epilogue(dY @ W_down)
    launch("bwd", 2 * up, M=2 * N, N=K, K=M)                # [dW_gate; dW_up] = [dG | dU]^T X
    if bias:
        reduction("bwd", M, 2 * N)                          # [db_gate | db_up]
    launch("bwd", 2 * up, M=M, N=K, K=N, two_k=True)        # dX = dG @ W_gate + dU @ W_up

    linear_in = (M * K + N * K + b * N + M * N) * e
    for _ in range(2):                                      # gate, up: addmm
        eager("eager_fwd", up, linear_in, (M, N))
    eager("eager_fwd", 0, 2 * M * N * e)                    # a = act(g)
    eager("eager_fwd", 0, 3 * M * N * e)                    # h = a * u
    eager("eager_fwd", down, (M * N + D * N + b * D + M * D) * e, (M, D))
    eager("eager_bwd", down, (M * D + M * N + D * N) * e, (D, N))   # dW_down
    if bias:
        eager("eager_bwd", 0, (M * D + D) * e)                      # db_down
    eager("eager_bwd", down, (M * D + D * N + M * N) * e, (M, N))   # dH
    for _ in range(3):                                              # dA = dH*u, dU = dH*a, dG = act'(g)*dA
        eager("eager_bwd", 0, 3 * M * N * e)
    for _ in range(2):                                              # up, gate: dW, db, dX
        eager("eager_bwd", up, (M * N + M * K + N * K) * e, (N, K))
        if bias:
            eager("eager_bwd", 0, (M * N + N) * e)
        eager("eager_bwd", up, (M * N + N * K + M * K) * e, (M, K))
    eager("eager_bwd", 0, 3 * M * K * e)                            # dX = dX_gate + dX_up
    elementwise = sum(x["hbm"] for step in ("eager_fwd", "eager_bwd") for x in detail[step] if x["rows"] is None)
    eager_total = lambda step: {"hbm": sum(x["hbm"] for x in detail[step]), "launches": len(detail[step])}  # noqa: E731
    return {"fwd": _totals(ours["fwd"]), "bwd": _totals(ours["bwd"]), "eager_fwd": eager_total("eager_fwd"),
            "eager_bwd": eager_total("eager_bwd"), "eager_elementwise_hbm": elementwise, "per_launch": detail}


def mapped_gemm_traffic(M: int, N: int, K: int, tile: tuple[int, int, int], elem: int, *, mapped: int, C: int,
                        G: int, rows_norm: int = 0, norm_width: int = 0, bias: bool = False, store_aux: bool = False,
                        acc_elem: int = 4, table: bool = True, gated: bool = False,
                        folded: bool = False, post: bool = False) -> dict[str, Traffic]:
    """Per operand of one ``mapped_gemm_kernel`` launch (kernels/merged_gemm.py) of GEMM (M, N, K) with
    tile (BLOCK_M, BLOCK_N, BLOCK_K), channel blocks aligned to C (ALIGNED: one token per row per
    step). ``mapped`` 0: A is the merged operand ("x", loaded like A; per program, K step and row: one
    table entry and, with a norm, a (mean, rstd) pair; per step and column gamma and beta); 1: B is
    (per K step and B row the same, per step and column gamma / beta); 2: C goes through the table
    (one entry per stored row). ``rows_norm``: normalised rows (0: no norm); ``norm_width``: gamma's
    length. The table is a permutation: every token once. ``table`` False (Qwen's view merge): tokens
    computed, no table read. The forward through a table looks each row's tokens up once per slot j
    (G per program row), with its (mean, rstd) per slot, not per K step. ``gated`` (mapped 0): the up
    half's W^T, bias and pre-activation beside the gate's ("b2", "bias2", "aux2"), A loaded once.
    ``folded`` (mapped 0, an RMSNorm folded into B = gamma * W): no gamma / beta loads; per program only
    rstd, per row and slot j (a norm per token) or per row once (``post``: per merged row)."""
    bm, bn, bk = tile
    t = fused_gemm_traffic(M, N, K, (bm, bn), elem, bias=bias, store_aux=store_aux, gated=gated)
    pm, pn = _cdiv(M, bm), _cdiv(N, bn)
    steps = _cdiv(K, bk)
    if mapped == 2:
        t["x_grad"] = t.pop("c")
        t["table"] = Traffic(loaded=pn * M * 4, unique=M * (N // C) * 4) if table else Traffic()
        return t
    if mapped == 0:
        t["x"] = t.pop("a")
        # rows wrap (always loaded); the K tail masked
        lookups, columns = pm * pn * bm * (G if table else steps), pm * pn * K
        merged_rows = M
    else:
        t["x"] = t.pop("b")
        lookups, columns = pm * pn * K, pm * pn * steps * bn  # rows masked to K; columns wrap
        merged_rows = K
    t["table"] = Traffic(loaded=lookups * 4, unique=merged_rows * G * 4) if table else Traffic()
    if rows_norm and folded:
        per_program = bm * (1 if post else G)  # rstd per row and slot, or per merged row
        t["stats"] = Traffic(loaded=pm * pn * per_program * acc_elem, unique=rows_norm * acc_elem)
    elif rows_norm:
        t["stats"] = Traffic(loaded=2 * lookups * acc_elem, unique=2 * rows_norm * acc_elem)
        t["gamma_beta"] = Traffic(loaded=2 * columns * elem, unique=2 * norm_width * elem)
    return t


def norm_rows_traffic(M: int, C: int, G: int, elem: int, *, post: bool, table: bool, blocks=(16, 128),
                      acc_elem: int = 4, stats: bool = False, center: bool = True) -> dict[str, Traffic]:
    """``norm_rows_kernel`` (ALIGNED): the merged, normalised operand (M, G*C) written once: x read once
    through the map, per row and column step one table entry and one (mean, rstd) pair, per program
    and step gamma and beta. ``stats`` (the forward's launch): each program first passes over its rows
    as ``norm_stats_traffic`` does (twice for a LayerNorm: ``center``; from L2: x's HBM bytes once) and
    stores their (mean, rstd), which its rows then read back."""
    br, bc = blocks
    K = G * C
    programs, steps = _cdiv(M, br), _cdiv(K, bc)
    rows_norm = M if post else M * G
    width = K if post else C
    passes = (2 if center else 1) if stats else 0
    return {"x": Traffic(loaded=(1 + passes) * M * K * elem, unique=M * K * elem),
            "table": Traffic(loaded=(1 + passes) * M * steps * 4, unique=M * G * 4) if table else Traffic(),
            "stats": Traffic(loaded=2 * M * steps * acc_elem, unique=2 * rows_norm * acc_elem,
                             stored=2 * rows_norm * acc_elem if stats else 0),
            "gamma_beta": Traffic(loaded=2 * programs * K * elem, unique=2 * width * elem),
            "out": Traffic(stored=M * K * elem)}


def fold_gamma_traffic(N: int, K: int, width: int, elem: int, blocks=(16, 128)) -> dict[str, Traffic]:
    """The fold programs of ``norm_stats_kernel``: W (N, K) read once, gamma per program and column
    step (``width`` distinct values: C per token, K per merged row), gamma * W stored."""
    programs = _cdiv(N, blocks[0])
    return {"w": Traffic(loaded=N * K * elem, unique=N * K * elem),
            "gamma": Traffic(loaded=programs * K * elem, unique=width * elem),
            "wf": Traffic(stored=N * K * elem)}


def norm_stats_traffic(R: int, C: int, G: int, elem: int, *, center: bool, blocks=(16, 128), acc_elem: int = 4,
                       table_rows: int | None = None, table: bool = True) -> dict[str, Traffic]:
    """``norm_stats_kernel`` over R rows of G tokens x C channels (ALIGNED: C % BLOCK_C == 0): one
    pass over x (RMSNorm) or two (LayerNorm: the mean first), one table entry per row per column
    block and pass (none without a table: source tokens, or Qwen's view merge); stores (mean, rstd)
    per row."""
    br, bc = blocks
    passes = 2 if center else 1
    steps = _cdiv(G * C, bc)
    return {"x": Traffic(loaded=passes * R * G * C * elem, unique=R * G * C * elem),
            "table": Traffic(loaded=passes * R * steps * 4, unique=(table_rows or R) * G * 4) if table else Traffic(),
            "stats": Traffic(stored=2 * R * acc_elem)}


def norm_bwd_traffic(R: int, C: int, G: int, elem: int, *, post: bool, blocks=(16, 128), acc_elem: int = 4,
                     table: bool = True) -> dict[str, Traffic]:
    """``norm_bwd_kernel`` (ALIGNED): two passes over x and dA (the row sums, then dx), gamma per
    program and pass, the statistics once, one table lookup per row and column block and pass (shared by
    x, dA and dx); stores dx and one fp32 dgamma and dbeta partial row per program."""
    br, bc = blocks
    programs, width, steps = _cdiv(R, br), G * C, _cdiv(G * C, bc)
    once = R * width * elem
    return {"x": Traffic(2 * once, once), "da": Traffic(2 * once, once),
            "stats": Traffic(2 * R * acc_elem, 2 * R * acc_elem),
            "gamma": Traffic(2 * programs * width * elem, (width if post else C) * elem),
            "table": Traffic(2 * R * steps * 4, R * G * 4) if table else Traffic(),
            "dx": Traffic(stored=once), "partials": Traffic(stored=2 * programs * width * acc_elem)}


def merged_mlp_traffic(T: int, C: int, G: int, widths, tile, elem: int, *, norm: str | None, post: bool,
                       table: bool, acc_elem: int = 4, bk: int = 64, training: bool = True,
                       gated: bool = False, bias: bool = True, folded: bool | None = None,
                       materialised: bool | None = None, written: bool | None = None) -> dict[str, dict]:
    """``mmfuse.merged_mlp`` in training (biases on, GELU between layers) against eager PyTorch running
    the module's own code, in the form of ``mlp_traffic``: ``hbm`` = distinct bytes per launch.

    mmfuse: forward = the norm statistics (x once; 8 bytes per normalised row), the mapped GEMM (x read
    through the table and normalised in the load), then the MLP; backward = each later layer's dW, db,
    dX * act', then the first layer's dW (x through the table again), db, dA (stored through the table)
    and the norm backward (dA, x, the statistics; dx and fp32 per-program partials of dgamma, dbeta).
    Eager: the norm (F.layer_norm: one kernel; RMSNorm as transformers writes it: to(fp32), pow, mean,
    rsqrt, mul, to(dtype), mul by the weight), the merge (a pixel shuffle's two permute copies when
    ``table``; Qwen's view merge is free), then the MLP (``mlp_traffic``'s eager launches), and autograd
    through all of it. ``tile``: (BLOCK_M, BLOCK_N) of every GEMM, ``bk`` the mapped GEMMs' BLOCK_K.
    ``training`` False: the inference forward (no pre-activations saved; "bwd" then meaningless).
    ``gated``: widths = (N, D) of Aya Vision's SwiGLU on one chunked (2N, K) weight: the first GEMM
    computes gate and up from one A tile (g and u saved), the backward's [dG | dU] comes from the down
    layer's dX GEMM (the product rule in its epilogue), and the first layer's dW, db and dA reduce over
    2N. Eager then runs linear_1 (2N wide), chunk (a view), act, mul, linear_2, and autograd (the
    chunk's backward: a copy of [dU | dG]). ``bias`` False: Linears without biases (Idefics3; not gated).
    ``folded``: the RMSNorm forward with gamma folded into the first weight (the statistics' launch also
    writes gamma * W; the GEMM reads it and x raw); None: the launcher's rule (``fold_applies``: RMSNorm,
    at least FOLD_MIN_ROWS merged rows; C % bk == 0 or a norm per merged row). ``materialised``: the
    backward writes the normalised operand once and runs dW unmapped (``materialise_applies``: a norm,
    at least FOLD_MIN_ROWS merged rows; None: that rule). ``written``: the forward writes the normalised
    operand once (``norm_rows_kernel``) and runs its first GEMM unmapped (``written_forward_applies``:
    a norm, not gated, from FOLD_MIN_ROWS merged rows, where its time model says it saves time; None:
    that rule): the row-wise pass computing the statistics itself (a norm per merged row, or per token
    without a table; else the statistics' launch first, without the fold), an unmapped GEMM."""
    from mmfuse.kernels.merged_gemm import FOLD_MIN_ROWS, written_forward_saves_us

    if materialised is None:
        materialised = bool(norm) and T // G >= FOLD_MIN_ROWS
    if gated:
        return _merged_gated_traffic(T, C, G, widths, tile, elem, norm=norm, post=post, table=table,
                                     acc_elem=acc_elem, bk=bk, training=training, materialised=materialised)
    e = elem
    M, K = T // G, G * C
    rows_norm = (M if post else T) if norm else 0
    norm_width = K if post else C
    layers = list(zip((K, *widths[:-1]), widths))
    mlp = mlp_traffic(M, (K, *widths), tile, e, bias=bias)
    n1, k1 = layers[0][1], K
    if folded is None:
        folded = norm == "rms" and M >= FOLD_MIN_ROWS and (post or C % bk == 0)
    if written is None:
        written = bool(norm) and e <= 4 and M >= FOLD_MIN_ROWS and written_forward_saves_us(
            M, K, n1, e, norm, table, folded) > 0
    fwd, bwd = [], []
    if written:  # the statistics, the normalised operand written once, an unmapped first GEMM
        rows_stats = (post or not table) and e <= 4  # (``rows_take_stats``: one launch for both)
        fwd += [] if rows_stats else _norm_stats_launch(T, C, G, e, norm, post, table, acc_elem)
        fwd.append(sum(norm_rows_traffic(M, C, G, e, post=post, table=table, acc_elem=acc_elem, stats=rows_stats,
                                         center=norm == "layer").values(), Traffic()))
        fwd.append(sum(fused_gemm_traffic(M, n1, k1, tile, e, bias=bias,
                                          store_aux=training and len(layers) > 1).values(), Traffic()))
    else:
        fwd += _norm_stats_launch(T, C, G, e, norm, post, table, acc_elem,
                                  fold=(n1, K, norm_width) if folded else None)
        fwd.append(sum(mapped_gemm_traffic(M, n1, k1, (*tile[:2], bk), e, mapped=0, C=C, G=G, rows_norm=rows_norm,
                                           norm_width=norm_width, bias=bias, store_aux=training and len(layers) > 1,
                                           acc_elem=acc_elem, table=table, folded=folded, post=post).values(),
                       Traffic()))
    for i, (k, n) in enumerate(layers[1:], start=1):
        fwd.append(sum(fused_gemm_traffic(M, n, k, tile, e, bias=bias,
                                          store_aux=training and i < len(layers) - 1).values(), Traffic()))
    for i in reversed(range(1, len(layers))):
        k, n = layers[i]
        bwd.append(sum(fused_gemm_traffic(n, k, M, tile, e).values(), Traffic()))                   # dW_i
        bwd += [bias_grad_traffic(M, n, e)] if bias else []                                           # db_i
        bwd.append(sum(fused_gemm_traffic(M, k, n, tile, e, act_grad=True).values(), Traffic()))    # dX * act'
    bwd += _first_dw_launches(M, n1, C, G, tile, bk, e, rows_norm=rows_norm, norm_width=norm_width, post=post,
                              table=table, acc_elem=acc_elem, materialised=materialised)
    bwd += [bias_grad_traffic(M, n1, e)] if bias else []
    bwd.append(sum(mapped_gemm_traffic(M, K, n1, (*tile[:2], bk), e, mapped=2, C=C, G=G, table=table).values(),
                   Traffic()))
    bwd += _norm_bwd_launches(T, C, G, e, norm, post, table, acc_elem)
    eager_f, eager_b = _eager_norm_merge(T, C, G, e, norm, post, table, acc_elem)
    return {"fwd": _totals(fwd), "bwd": _totals(bwd),
            "eager_fwd": {"hbm": sum(r + w for r, w in eager_f) + mlp["eager_fwd"]["hbm"],
                          "launches": len(eager_f) + mlp["eager_fwd"]["launches"]},
            "eager_bwd": {"hbm": sum(r + w for r, w in eager_b) + mlp["eager_bwd"]["hbm"],
                          "launches": len(eager_b) + mlp["eager_bwd"]["launches"]}}


def _first_dw_launches(M, N, C, G, tile, bk, e, *, rows_norm, norm_width, post, table, acc_elem,
                       materialised) -> list:
    """The first layer's dW: the mapped GEMM reading x through the map (and normalising it in its loads),
    or the normalised operand written once and an unmapped GEMM."""
    K = G * C
    if materialised:
        rows = norm_rows_traffic(M, C, G, e, post=post, table=table, acc_elem=acc_elem)
        return [sum(rows.values(), Traffic()), sum(fused_gemm_traffic(N, K, M, tile, e).values(), Traffic())]
    return [sum(mapped_gemm_traffic(N, K, M, (*tile[:2], bk), e, mapped=1, C=C, G=G, rows_norm=rows_norm,
                                    norm_width=norm_width, acc_elem=acc_elem, table=table).values(), Traffic())]


def _norm_stats_launch(T, C, G, e, norm, post, table, acc_elem, fold=None) -> list:
    """The norm statistics' launch of a merged projector (none without a norm); ``fold`` (N, K, gamma's
    width): the same launch also writes gamma * W."""
    if not norm:
        return []
    rows, g = (T // G, G) if post else (T, 1)
    stats = sum(norm_stats_traffic(rows, C, g, e, center=norm == "layer", acc_elem=acc_elem,
                                   table=table and post).values(), Traffic())
    return [stats + sum(fold_gamma_traffic(*fold, e).values(), Traffic()) if fold else stats]


def _norm_bwd_launches(T, C, G, e, norm, post, table, acc_elem) -> list:
    """The norm backward's launch and the ordered sum of its dgamma / dbeta partials (none without a norm)."""
    if not norm:
        return []
    rows, g = (T // G, G) if post else (T, 1)
    norm_width = G * C if post else C
    nb = norm_bwd_traffic(rows, C, g, e, post=post, acc_elem=acc_elem, table=table and post)
    partials = nb["partials"].stored  # summed in order by torch: read once, dgamma / dbeta written
    return [sum(nb.values(), Traffic()), Traffic(loaded=partials, unique=partials,
                                                 stored=2 * norm_width * (acc_elem + e))]


def _eager_norm_merge(T, C, G, e, norm, post, table, acc_elem) -> tuple[list, list]:
    """Eager's (read, written) bytes per launch of the norm and the merge, forward and backward."""
    rows_norm = (T // G if post else T) if norm else 0
    norm_width = G * C if post else C
    TC = T * C
    if norm == "layer":
        norm_f = [(TC * e + 2 * norm_width * e, TC * e + 2 * rows_norm * acc_elem)]
        norm_b = [(2 * TC * e + 2 * rows_norm * acc_elem + norm_width * e, TC * e + 2 * norm_width * e)]
    elif norm == "rms":
        f32 = 4
        norm_f = [(TC * e, TC * f32), (TC * f32, TC * f32), (TC * f32, rows_norm * f32), (rows_norm * f32, rows_norm * f32),
                  (TC * f32 + rows_norm * f32, TC * f32), (TC * f32, TC * e), (TC * e + norm_width * e, TC * e)]
        # autograd: weight-mul (dx, dweight), to(dtype), mul (two grads), rsqrt/mean (tiny), pow, the
        # accumulation of x32's two gradients, to(fp32)
        norm_b = [(TC * e + norm_width * e, TC * e), (2 * TC * e, norm_width * e), (TC * e, TC * f32),
                  (TC * f32 + rows_norm * f32, TC * f32), (2 * TC * f32, rows_norm * f32),
                  (rows_norm * f32, TC * f32), (2 * TC * f32, TC * f32), (2 * TC * f32, TC * f32),
                  (TC * f32, TC * e)]
    else:
        norm_f, norm_b = [], []
    # A pixel shuffle materialises two permutes: InternVL's two .contiguous(), Idefics3's two reshapes of a
    # permute, Aya's one reshape and the LayerNorm's own contiguous copy of the permuted rows (recorded op
    # by op in tests/test_traffic.py); its gradient is the same two copies, inverse order.
    merge_f = [(TC * e, TC * e)] * 2 if table else []
    merge_b = [(TC * e, TC * e)] * 2 if table else []
    return norm_f + merge_f, merge_b + norm_b


def _merged_gated_traffic(T, C, G, widths, tile, e, *, norm, post, table, acc_elem, bk, training, materialised):
    """``merged_mlp_traffic`` of the gated form (its docstring)."""
    M, K = T // G, G * C
    N, D = widths
    rows_norm = (M if post else T) if norm else 0
    norm_width = K if post else C
    mapped = dict(C=C, G=G, rows_norm=rows_norm, norm_width=norm_width, acc_elem=acc_elem, table=table)
    fwd = _norm_stats_launch(T, C, G, e, norm, post, table, acc_elem)
    fwd.append(sum(mapped_gemm_traffic(M, N, K, (*tile[:2], bk), e, mapped=0, bias=True, store_aux=training,
                                       gated=True, **mapped).values(), Traffic()))
    fwd.append(sum(fused_gemm_traffic(M, D, N, tile, e, bias=True).values(), Traffic()))
    bwd = [sum(fused_gemm_traffic(D, N, M, tile, e).values(), Traffic()),                # dW_down
           bias_grad_traffic(M, D, e),                                                    # db_down
           sum(fused_gemm_traffic(M, N, D, tile, e, gate_grad=True).values(), Traffic()),  # [dG | dU]
           *_first_dw_launches(M, 2 * N, C, G, tile, bk, e, rows_norm=rows_norm, norm_width=norm_width, post=post,
                               table=table, acc_elem=acc_elem, materialised=materialised),
           bias_grad_traffic(M, 2 * N, e),
           sum(mapped_gemm_traffic(M, K, 2 * N, (*tile[:2], bk), e, mapped=2, C=C, G=G, table=table).values(),
               Traffic())]
    bwd += _norm_bwd_launches(T, C, G, e, norm, post, table, acc_elem)
    norm_f, norm_b = _eager_norm_merge(T, C, G, e, norm, post, table, acc_elem)
    MN, N2 = M * N, 2 * N
    eager_f = norm_f + [((M * K + N2 * K + N2) * e, M * N2 * e),   # linear_1 (addmm); chunk: a view
                        (MN * e, MN * e),                          # act(gate)
                        (2 * MN * e, MN * e),                      # act(gate) * up
                        ((MN + D * N + D) * e, M * D * e)]         # linear_2
    eager_b = [((M * D + MN) * e, D * N * e),                      # dW_2
               (M * D * e, D * e),                                 # db_2
               ((M * D + D * N) * e, MN * e),                      # dH
               (2 * MN * e, MN * e), (2 * MN * e, MN * e),         # the product's two halves
               (2 * MN * e, MN * e),                               # act': dG
               (2 * MN * e, M * N2 * e),                           # chunk's backward: [dU | dG], a copy
               ((M * N2 + M * K) * e, N2 * K * e),                 # dW_1
               (M * N2 * e, N2 * e),                               # db_1
               ((M * N2 + N2 * K) * e, M * K * e)] + norm_b        # dX_1, then the merge's and norm's
    return {"fwd": _totals(fwd), "bwd": _totals(bwd), "eager_fwd": _eager_totals(eager_f), "eager_bwd": _eager_totals(eager_b)}


def pool_norm_fwd_traffic(M: int, C: int, G: int, elem: int, *, norm: str | None, blocks=(16, 128),
                          acc_elem: int = 4) -> dict[str, Traffic]:
    """``pool_norm_fwd_kernel`` over M pooled rows of G tokens x C channels: x once (each token in one
    window), a table entry per row, slot and column block; with a norm the pooled rows stored, then read
    back twice (the centred squares, the output), gamma (and beta) per program, (mean, rstd) per row, the
    output; without one the pooled rows are the output."""
    br, bc = blocks
    programs, steps, once = _cdiv(M, br), _cdiv(C, bc), M * C * elem
    t = {"x": Traffic(loaded=G * once, unique=G * once),
         "table": Traffic(loaded=steps * M * G * 4, unique=M * G * 4), "out": Traffic(stored=once)}
    if norm:
        t["pooled"] = Traffic(loaded=2 * once, unique=once, stored=once)
        t["gamma"] = Traffic(loaded=programs * C * elem, unique=C * elem)
        if norm == "layer":
            t["beta"] = t["gamma"]
        t["stats"] = Traffic(stored=2 * M * acc_elem)
    return t


def pool_norm_bwd_traffic(M: int, C: int, G: int, elem: int, *, norm: str | None, blocks=(16, 128),
                          acc_elem: int = 4) -> dict[str, Traffic]:
    """``pool_norm_bwd_kernel``: with a norm two passes over dA and the pooled rows (the row sums, then
    dx), gamma per program and pass, the statistics once, fp32 dgamma / dbeta partial rows per program;
    dx spread to every window's G tokens (a table entry per row, slot and column block)."""
    br, bc = blocks
    programs, steps, once = _cdiv(M, br), _cdiv(C, bc), M * C * elem
    passes = 2 if norm else 1
    t = {"da": Traffic(loaded=passes * once, unique=once),
         "table": Traffic(loaded=steps * M * G * 4, unique=M * G * 4), "dx": Traffic(stored=G * once)}
    if norm:
        t["pooled"] = Traffic(loaded=2 * once, unique=once)
        t["stats"] = Traffic(loaded=2 * M * acc_elem, unique=2 * M * acc_elem)
        t["gamma"] = Traffic(loaded=2 * programs * C * elem, unique=C * elem)
        t["partials"] = Traffic(stored=2 * programs * C * acc_elem)
    return t


def pooled_projector_traffic(T: int, C: int, G: int, N: int, tile, elem: int, *, norm: str = "rms",
                             blocks=(16, 128), acc_elem: int = 4) -> dict[str, dict]:
    """Gemma 3's projector (average pool of G tokens, RMSNorm scaled by 1 + weight, ``@ W`` (C, N), no
    bias) in the form of ``merged_mlp_traffic``. mmfuse (``merged_mlp(pool=True)``): the pool-and-norm
    kernel, the GEMM; backward: dW, dA, the pool-and-norm backward, the ordered sum of its partials.
    Eager, the module's code: the grid's ``.contiguous()`` copy of the transposed tokens, AvgPool2d,
    Gemma3RMSNorm (to fp32, pow, mean, add + rsqrt, mul, (1 + w) in fp32, mul, to the dtype: its
    M x C passes), the matmul; autograd through all of it. (Inference moves the same bytes: the pooled
    rows go to a scratch buffer either way.)"""
    e, M = elem, T // G
    MC, TC = M * C, T * C
    fwd = [sum(pool_norm_fwd_traffic(M, C, G, e, norm=norm, blocks=blocks, acc_elem=acc_elem).values(), Traffic())]
    fwd.append(sum(fused_gemm_traffic(M, N, C, tile, e).values(), Traffic()))
    bwd = [sum(fused_gemm_traffic(N, C, M, tile, e).values(), Traffic()),                  # dW^T
           sum(fused_gemm_traffic(M, C, N, tile, e).values(), Traffic())]                  # dA
    nb = pool_norm_bwd_traffic(M, C, G, e, norm=norm, blocks=blocks, acc_elem=acc_elem)
    partials = nb["partials"].stored
    bwd += [sum(nb.values(), Traffic()), Traffic(loaded=partials, unique=partials, stored=C * (acc_elem + e))]
    f32 = 4
    eager_f = [(TC * e, TC * e),                              # transpose(1, 2).reshape(...).contiguous()
               (TC * e, MC * e),                              # AvgPool2d
               (MC * e, MC * f32), (MC * f32, MC * f32),      # to(fp32), pow
               (MC * f32, M * f32), (M * f32, M * f32),       # mean, rsqrt(+ eps)
               (MC * f32 + M * f32, MC * f32),                # x * rsqrt
               (C * e, C * f32), (MC * f32 + C * f32, MC * f32),  # 1 + w.float(), mul
               (MC * f32, MC * e),                            # type_as
               ((MC + C * N) * e, M * N * e)]                 # matmul
    eager_b = [((M * N + MC) * e, C * N * e), ((M * N + C * N) * e, MC * e),    # matmul: dW, dX
               (MC * e, MC * f32),                                               # type_as backward
               (MC * f32 + C * f32, MC * f32), (2 * MC * f32, C * f32),          # mul: d(normed), d(1 + w)
               (C * f32, C * e),                                                 # w.float() backward
               (MC * f32 + M * f32, MC * f32), (2 * MC * f32, M * f32),          # x * rsqrt: dx, d(rsqrt)
               (M * f32, M * f32), (M * f32, MC * f32),                          # rsqrt', mean'
               (2 * MC * f32, MC * f32), (2 * MC * f32, MC * f32),               # pow', the two dx summed
               (MC * f32, MC * e),                                               # to(fp32) backward
               (MC * e, TC * e),                                                 # AvgPool2d backward
               (TC * e, TC * e)]                                                 # the copy's backward
    return {"fwd": _totals(fwd), "bwd": _totals(bwd), "eager_fwd": _eager_totals(eager_f), "eager_bwd": _eager_totals(eager_b)}
