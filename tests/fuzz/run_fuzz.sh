#!/usr/bin/env bash
# Runs the fuzz targets (model, tokenizer, sampler) for FUZZ_SECONDS each (default 45) from
# the committed seed corpora.
# A crash leaves its input in build/fuzz/artifacts/ and fails the run: turn it into a row of
# tests/test_hostile.py (or a seed here) once fixed. Prints executions per target.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS_EACH=${FUZZ_SECONDS:-45}
PYTHON=${PYTHON:-/usr/bin/python3}
F=build/fuzz
mkdir -p $F/work-model $F/work-tokenizer $F/work-sampler $F/artifacts
# the real 128K Llama 3 tokenizer for the text half of fuzz_tokenizer
if [ ! -s $F/llama3.tok ]; then
    $PYTHON export.py --tokenizer-only $F/llama3.tok --tokenizer tests/data/tokenizer/tokenizer.model --specials llama3 >/dev/null
fi
status=0
for target in model tokenizer sampler; do
    log=$F/$target.log
    [ $target = tokenizer ] && export LLAMA3C_FUZZ_TOK=$F/llama3.tok
    if ! $F/fuzz_$target -max_total_time="$SECONDS_EACH" -max_len=8192 -timeout=10 \
            -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix=$F/artifacts/ \
            $F/work-$target tests/fuzz/corpus/$target >"$log" 2>&1; then
        echo "fuzz_$target: FOUND A CRASH (see $log, input in $F/artifacts/)"
        grep -m5 -E "ERROR|runtime error|SUMMARY" "$log" || true
        status=1
    fi
    runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo "?")
    speed=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo "?")
    echo "fuzz_$target: $runs executions in ${SECONDS_EACH}s ($speed/s)"
done
exit $status
