"""The README's results section, generated from the latest results file in ``bench/results``.

A measured results file (``<gpu>-<date>.json`` from ``mmfuse bench`` on a GPU) gives a table of
timings labelled as measured, with the GPU and date. Without one, the section says that nothing has
been timed and points at the newest no-GPU report, whose figures are computed or modelled. The
section lies between two markers in README.md; everything outside them is left as it is.
"""

from __future__ import annotations

import glob
import json
import os
import re

START = "<!-- results:start -->"
END = "<!-- results:end -->"


def latest(results_dir: str) -> tuple[str, str] | None:
    """("measured", path) for the newest timing file, else ("modelled", path) for the newest
    no-GPU report, else None. Newest = latest date in the name, then name."""
    def newest(paths):
        def key(p):
            date = re.search(r"\d{4}-\d{2}-\d{2}", os.path.basename(p))
            return (date.group(0) if date else "", p)
        return max(paths, key=key) if paths else None

    # (kernel-profile-*.json beside a benchmark file holds per-kernel figures, not the suite's rows)
    measured = newest([p for p in glob.glob(os.path.join(results_dir, "*.json"))
                       if not os.path.basename(p).startswith("kernel-profile-")])
    if measured:
        return "measured", measured
    report = newest(glob.glob(os.path.join(results_dir, "no-gpu-*-report.md")))
    return ("modelled", report) if report else None


def section(results_dir: str) -> str:
    found = latest(results_dir)
    if found is None:
        return "No results yet: run `mmfuse bench`."
    kind, path = found
    rel = os.path.basename(path)
    if kind == "modelled":
        return ("No GPU has run the suite yet: there are **no measured timings** in this repository.\n"
                f"The latest report (`{rel}`) is computed, not timed: compile figures from Triton's AOT "
                "compiler (sm_80, sm_90), launch grids and wave efficiency on 132 SMs, and HBM bytes from "
                "a traffic model checked against interpreted runs, with the H100 roofline times they "
                "imply. Those are predictions, not measurements.")
    with open(path) as f:
        data = json.load(f)
    roof = next((r["ceilings"] for r in data["rows"] if "ceilings" in r), None)
    versions = ", ".join(f"{k} {data[k]}" for k in ("torch", "triton") if data.get(k))
    lines = [f"Measured on **{data['gpu']}**, {data['date']} (`{rel}`{'; ' + versions if versions else ''}): "
             "median time of many runs after warm-up, inputs rotated past L2."]
    if roof:
        lines.append(f"Ceilings measured in the same run: {roof['tflops']:.0f} TFLOP/s (bf16 GEMM), "
                     f"{roof['gbps']:.0f} GB/s (copy).")
    lines += ["", "| op / shape / mode / dtype | mmfuse ms | fastest PyTorch baseline | its ms | speedup |",
              "| --- | --- | --- | --- | --- |"]
    rows = [r for r in data["rows"] if "case" in r and "ms" in r]
    for key in sorted({r["case"].rsplit("/", 1)[0] for r in rows}):
        ours = next((r for r in rows if r["case"] == f"{key}/mmfuse"), None)
        # PyTorch's baselines only: "mmfuse glue", "mmfuse linears", "mmfuse GEMM" are mmfuse's own
        # kernels without this op's fusion (what the fusion gains), not what a user would run instead.
        others = [r for r in rows if r["case"].startswith(key + "/") and not r["impl"].startswith("mmfuse")]
        if ours and others:
            best = min(others, key=lambda r: r["ms"])
            lines.append(f"| {key} | {ours['ms']:.4f} | {best['impl']} | {best['ms']:.4f} | "
                         f"{best['ms'] / ours['ms']:.2f}x |")
    return "\n".join(lines)


def rewrite(readme_path: str, results_dir: str) -> bool:
    """Replace the text between the markers; returns whether the file changed."""
    with open(readme_path) as f:
        text = f.read()
    if START not in text or END not in text:
        raise ValueError(f"{readme_path}: no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{section(results_dir)}\n{END}{tail}"
    if new != text:
        with open(readme_path, "w") as f:
            f.write(new)
    return new != text
