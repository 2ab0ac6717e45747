#!/usr/bin/env bash
# Session 20's second H100 call (after the CENTER fix and the 4-warp forward): the failed checks of the
# first call again, then probe.py. Run from the repository root with the wheel in .whl/.
repo=$(pwd)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mmfuse-site .whl/mmfuse-*.whl
export PYTHONPATH=/tmp/mmfuse-site
cd /tmp
for i in 0 1 2 3; do
  timeout 100 python3 -m mmfuse.cli verify --device cuda --op merged_mlp cross_attention --shard $i/4 \
    > "$OUT/verify-$i.txt" 2>&1 &
done
wait
grep -h "passed, " "$OUT"/verify-*.txt; grep -h "FAIL" "$OUT"/verify-*.txt | head
MMFUSE_TEST_DEVICE=cuda timeout 80 python3 -m pytest -q -rfE --tb=short -n 8 -c "$repo/pyproject.toml" \
  --rootdir "$repo" -p no:cacheprovider "$repo/tests/test_cross_attention.py" "$repo/tests/test_merged_mlp.py" \
  > "$OUT/tests.txt" 2>&1
tail -4 "$OUT/tests.txt"
timeout 90 python3 "$repo/bench/results/h100-2026-11-27-session20/call3/probe.py" "$OUT/probe.json" \
  > "$OUT/probe.txt" 2>&1
tail -3 "$OUT/probe.txt"
cd "$OUT" && tar czf call3.tgz verify-*.txt tests.txt probe.json probe.txt 2>/dev/null; rm -f verify-*.txt tests.txt probe.txt
