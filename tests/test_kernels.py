"""run.c's kernels against plain loops (tests/test_kernels.c), in the native build (AVX-512
where the machine has it), an AVX2 build and a portable build; and the prompt path (blocks of
tokens) against decoding one token at a time on small exported checkpoints."""
import os
import subprocess

import make_checkpoint
from common import PYTHON, REPO, run, scratch

BUILDS = {  # name: compiler flags (the Makefile's CFLAGS first)
    "native": ["-O3", "-march=native", "-fopenmp"],
    "avx2": ["-O3", "-march=haswell", "-fopenmp"],  # AVX2, FMA, F16C
    "portable": ["-O2"],
}
WORK = scratch("kernels")
_built = {}


def build(name):
    if name not in _built:
        out = os.path.join(WORK, "test_kernels-" + name)
        run(["cc", "-std=c11", "-Wall", "-Wextra", "-Werror", *BUILDS[name], "-o", out,
             os.path.join(REPO, "tests", "test_kernels.c"), os.path.join(REPO, "tokenizer.c"),
             "-lm"])
        _built[name] = out
    return _built[name]


def run_checks(args):
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    print("    " + proc.stdout.strip().replace("\n", "\n    "))
    assert proc.returncode == 0, f"{proc.returncode} checks failed:\n{proc.stderr[-2000:]}"


def test_kernels_native():
    run_checks([build("native")])


def test_kernels_avx2():
    run_checks([build("avx2")])


def test_kernels_portable():
    run_checks([build("portable")])


def test_prompt_blocks_match_one_token_at_a_time():
    folder = os.path.join(WORK, "hf-tiny32")
    make_checkpoint.make_checkpoint(folder, "tiny32")
    for dtype in ("fp32", "bf16", "q8_0", "q4_0"):
        model = os.path.join(WORK, f"tiny32-{dtype}.bin")
        run([PYTHON, os.path.join(REPO, "export.py"), model, "--hf", folder, "--dtype", dtype])
        for name in ("native", "avx2", "portable"):
            run_checks([build(name), model, "600"])  # three blocks, the last one ragged


def test_prompt_blocks_one_layer_model():
    """With one layer, the first layer is the last one, whose skipped tokens feed the cache."""
    folder = os.path.join(WORK, "hf-one-layer")
    make_checkpoint.make_checkpoint(folder, "tiny32", config={"num_hidden_layers": 1})
    model = os.path.join(WORK, "one-layer-fp32.bin")
    run([PYTHON, os.path.join(REPO, "export.py"), model, "--hf", folder, "--dtype", "fp32"])
    run_checks([build("native"), model, "300"])  # two blocks


def test_decode_parts_tool():
    """tests/decode_parts.c (make bench) builds warning-free against run.c as it is now and
    reports all four parts of a decoding step over the rounds it ran. The rates themselves
    depend on the machine and its load (a busy one prints 0.0 for a tiny model), so only their
    form is checked: a number each, and one row of them per state covering every round."""
    out = os.path.join(WORK, "decode_parts")
    run(["cc", "-std=c11", "-Wall", "-Wextra", "-Werror", *BUILDS["native"], "-o", out,
         os.path.join(REPO, "tests", "decode_parts.c"), os.path.join(REPO, "tokenizer.c"),
         "-lm"])
    folder = os.path.join(WORK, "hf-parts")
    make_checkpoint.make_checkpoint(folder, "tiny32")
    for dtype, extra in (("fp32", []), ("q8_0", []), ("q8_0", ["fast"]), ("q4_0", [])):
        model = os.path.join(WORK, f"parts-{dtype}.bin")
        if not os.path.exists(model):
            run([PYTHON, os.path.join(REPO, "export.py"), model, "--hf", folder, "--dtype", dtype])
        proc = subprocess.run([out, model, "0.3", *extra], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        print("    " + "\n    ".join(lines))
        assert f"{dtype} weights" in lines[0] and ("-a fast" in lines[0]) == bool(extra)
        reports = [line for line in lines[1:] if " rounds:" in line]
        assert 1 <= len(reports) <= 2, proc.stdout
        rounds = 0
        for line in reports:
            rounds += int(line.split(" rounds:")[0].split()[-1])
            parts = line.split(":", 1)[1].split("GB/s")[0].split()
            # name, rate, (percent of contiguous) for each part, in order
            assert parts[0::3] == ["contiguous", "rows", "matmuls", "forward"], line
            for rate, share in zip(parts[1::3], parts[2::3]):
                assert float(rate) >= 0 and share.startswith("(") and share.endswith("%)"), line
            assert float(line.split("forward ")[-1].split(" tok/s")[0]) >= 0, line
        assert rounds >= 1, proc.stdout
