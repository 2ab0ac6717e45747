#!/usr/bin/env bash
# Session 17's third GPU call: the written-operand forward on CUDA (values, the table check's assert) and timed.
R=$PWD; S=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mmfuse-site $(ls -t .whl/mmfuse-*.whl | head -1)
export PYTHONPATH=/tmp/mmfuse-site MMFUSE_REPO=$R
mkdir -p /tmp/r3; cp $R/bench/results/h100-2026-11-27-session17/call3/written_probe.py /tmp/r3/probe.py; cd /tmp
MMFUSE_TEST_DEVICE=cuda timeout 100 python3 -m pytest -q -rfE --tb=short -n 8 -c $R/pyproject.toml --rootdir $R \
  -p no:cacheprovider $R/tests/test_merged_mlp.py -k "written or table_values or device_check" > /tmp/r3/tests.txt 2>&1
echo "tests rc=$? at $((SECONDS-S)) s"; tail -2 /tmp/r3/tests.txt
timeout 90 python3 /tmp/r3/probe.py /tmp/r3/probe.json > /tmp/r3/probe.txt 2>&1; echo "probe rc=$? at $((SECONDS-S)) s"
tail -30 /tmp/r3/probe.txt; tar czf $OUT/r3.tgz -C /tmp r3
