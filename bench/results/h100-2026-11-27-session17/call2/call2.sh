#!/usr/bin/env bash
# Session 17's second GPU call (not committed).
R=$PWD; S=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mmfuse-site $(ls -t .whl/mmfuse-*.whl | head -1)
export PYTHONPATH=/tmp/mmfuse-site MMFUSE_REPO=$R
mkdir -p /tmp/r2; cd /tmp
step() { local name=$1 limit=$2; shift 2; timeout $limit "$@" > /tmp/r2/$name.txt 2>&1; echo "$name rc=$? at $((SECONDS-S)) s"; tail -3 /tmp/r2/$name.txt; }
MMFUSE_TEST_DEVICE=cuda step tests 140 python3 -m pytest -q -rfE --tb=short -n 8 -c $R/pyproject.toml --rootdir $R -p no:cacheprovider $R/tests/test_cuda_graphs.py $R/tests/test_cross_attention.py "$R/tests/test_tma_gemm.py::test_round_to_tf32_is_round_to_nearest_on_every_kind_of_value"
step bench-merger 110 python3 -m mmfuse.cli bench --op merged_mlp --shape qwen2.5-vl-7b-merger --impl eager torch.compile --dtype bfloat16 --out-dir /tmp/r2/merger
step bench-siglip 90 python3 -m mmfuse.cli bench --op mlp --shape siglip-so400m-tower-mlp --impl eager torch.compile --dtype bfloat16 --out-dir /tmp/r2/siglip
step probe 45 python3 $R/s17_probe.py /tmp/r2/probe.json
step profile 35 python3 -m mmfuse.bench.kernel_profile --out-dir /tmp/r2/profile --parts attention_splits
tar czf $OUT/r2.tgz -C /tmp r2; echo "total $((SECONDS-S)) s"
