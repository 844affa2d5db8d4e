#!/usr/bin/env python3
"""`make test-arm`: run.c's NEON kernels (section 8, AArch64) under qemu-aarch64 on any host.

Cross-compiles with Debian's gcc-aarch64-linux-gnu for the baseline armv8-a (NEON, no int8 dot
product) and for armv8.2-a+dotprod (sdot), then:
- tests/test_kernels.c in both builds: every kernel against plain loops, and prompt blocks
  against decoding on a small exported checkpoint;
- end to end: the aarch64 runomp (2 threads) and run, greedy on the small test checkpoints
  (tests/make_checkpoint.py's presets, every weight type, every KV cache type), against the
  host's portable build (plain -O2, no vector kernels): the same greedy ids, and logits within
  each type's tolerance; -a fast's int8 activations the same in both ARM builds.
Needs gcc-aarch64-linux-gnu, qemu-user and libgomp1-arm64-cross (.ci/run installs them). Not
part of `make test` (tests/run_tests.py runs tests/test_*.py only). Prints one line per check
and `N passed, N failed`; exits non-zero on a failure."""
import os
import sys
import time

import numpy as np

import make_checkpoint
from common import PYTHON, REPO, run, scratch, remove_scratch

CC = os.environ.get("ARM_CC", "aarch64-linux-gnu-gcc")
QEMU = ["qemu-aarch64", "-L", os.environ.get("ARM_SYSROOT", "/usr/aarch64-linux-gnu")]
ARCHES = {"armv8-a": "neon", "armv8.2-a+dotprod": "dotprod"}
WORK = scratch("arm")
SOURCES = [os.path.join(REPO, "run.c"), os.path.join(REPO, "tokenizer.c")]
WARN = ["-std=c11", "-Wall", "-Wextra", "-Werror"]


def build(name, arch, sources, flags=("-O3",)):
    out = os.path.join(WORK, f"{name}-{ARCHES[arch]}")
    if not os.path.exists(out):
        run([CC, *WARN, f"-march={arch}", *flags, "-o", out, *sources, "-lm"])
    return out


def export(preset, dtype):
    folder = os.path.join(WORK, "hf-" + preset)
    if not os.path.exists(folder):
        make_checkpoint.make_checkpoint(folder, preset)
    model = os.path.join(WORK, f"{preset}-{dtype}.bin")
    if not os.path.exists(model):
        run([PYTHON, os.path.join(REPO, "export.py"), model, "--hf", folder, "--dtype", dtype])
    return model


def kernel_checks(arch, *args):
    test = build("test_kernels", arch,
                 [os.path.join(REPO, "tests", "test_kernels.c"), SOURCES[1]],
                 ["-O2", "-fopenmp"])  # (gcc 12 for aarch64 fails on test_exp's loops at -O3)
    proc = run([*QEMU, test, *args], check=False)
    lines = proc.stdout.decode().strip().splitlines()
    for line in lines:
        if "FAIL" in line or args:  # (every line of a model's few)
            print("    " + line)
    print(f"    {arch}: {len(lines)} checks")
    assert proc.returncode == 0 and lines, f"{proc.returncode} checks failed"


def test_kernels_armv8a():
    kernel_checks("armv8-a")


def test_kernels_dotprod():
    kernel_checks("armv8.2-a+dotprod")


def test_prompt_blocks_match_one_token_at_a_time():
    for dtype in ("fp32", "bf16", "q8_0", "q4_0"):
        kernel_checks("armv8-a", export("tiny32", dtype), "40")
    kernel_checks("armv8.2-a+dotprod", export("tiny31", "q4_0"), "260")  # two blocks
    for cache in ("1", "2"):  # bf16, q8_0 caches
        kernel_checks("armv8-a", export("tiny31", "q8_0"), "40", cache)


PROMPT = [1, 5, 9, 200, 33, 7, 81, 12, 300, 2, 19, 77, 140, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
          15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]
STEPS = 8
_host = []


def greedy(binary, model, extra=(), qemu=True):
    """Greedy ids and every position's logits rows (-L)."""
    logits = os.path.join(WORK, "logits.f32")
    args = [binary, model, "-I", " ".join(map(str, PROMPT)), "-o", "ids", "-t", "0",
            "-n", str(STEPS), "-e", "0", "-L", logits, "-c", "64", *extra]
    proc = run(QEMU + args if qemu else args)
    ids = [int(t) for t in proc.stdout.split()]
    rows = np.fromfile(logits, "<f4").reshape(len(PROMPT) + STEPS - 1, -1)  # (the last unfed)
    return ids, rows


def relative(rows, want):
    """max over rows of max|a - b| / max|b| (tests/test_engine.py's worst_relative)."""
    return float((np.abs(rows - want).max(axis=1) / np.abs(want).max(axis=1)).max())


def arm_run(arch, threads):
    """The aarch64 runomp (OpenMP) or run of one -march."""
    if threads:
        return build("runomp", arch, SOURCES, ["-O3", "-fopenmp"])
    return build("run", arch, SOURCES)


def host_portable():
    if not _host:
        out = os.path.join(WORK, "run-host")
        run(["cc", *WARN, "-O2", "-o", out, *SOURCES, "-lm"])
        _host.append(out)
    return _host[0]


# Per weight type: how far the ARM logits may be from the portable build's. The same
# sums in another order (fp32, bf16); for q8_0 and q4_0 also decoding's exact int16 group
# sums against the same, but prompt blocks' float32 tiles in another order, which these
# peaked random models amplify (tests/test_kernels.c holds blocks to 1e-3 of decoding).
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-4, "q8_0": 1e-3, "q4_0": 1e-3}
# A bf16 or q8_0 cache rounds keys and values: where the builds' keys differ in their last
# bits, one may round a step the other way (test_kernels.c's bounds for blocks vs tokens).
CACHE_TOLERANCE = {"f32": 0.0, "bf16": 2e-2, "q8_0": 5e-2}


def test_greedy_matches_portable_build():
    """Every preset and weight type with the f32 cache, the builds taking turns (runomp on 2
    threads, run); bf16 and q8_0 caches on the presets whose heads they take (q8_0: whole
    groups of 32 dimensions; tiny30's heads have 16)."""
    report = []
    builds = [("armv8-a", 2), ("armv8.2-a+dotprod", 0), ("armv8.2-a+dotprod", 2), ("armv8-a", 0)]
    cases = [(preset, dtype, "f32") for preset in ("tiny30", "tiny31", "tiny32")
             for dtype in ("fp32", "bf16", "q8_0", "q4_0")]
    cases += [(preset, dtype, cache) for preset in ("tiny31", "tiny32")
              for dtype in ("bf16", "q4_0") for cache in ("bf16", "q8_0")]
    for i, (preset, dtype, cache) in enumerate(cases):
        model, extra = export(preset, dtype), ("--cache-type", cache)
        want_ids, want = greedy(host_portable(), model, extra, qemu=False)
        arch, threads = builds[i % len(builds)]
        binary = arm_run(arch, threads)
        ids, rows = greedy(binary, model, extra + (("-T", "2") if threads else ()))
        err, bound = relative(rows, want), max(TOLERANCE[dtype], CACHE_TOLERANCE[cache])
        report.append(f"{preset} {dtype} {cache} cache {os.path.basename(binary)}: {err:.1e}")
        assert ids == want_ids, f"{report[-1]}: greedy {ids} != {want_ids}"
        assert err <= bound, f"{report[-1]} > {bound}"
    print("    " + "\n    ".join(report))


def test_fast_activations_same_in_both_arm_builds():
    """-a fast rounds q8_0 and q4_0 activations to int8: sdot and the armv8-a path (smull +
    sadalp) make the same integer sums, so the same logits; and the rounding moves them from
    the exact path's by about what it does on x86 (q8_0 1.5e-1, q4_0 3e-1: test_engine.py,
    test_q4.py)."""
    report = []
    for preset in ("tiny31", "tiny32"):
        for dtype, bound in (("q8_0", 1.5e-1), ("q4_0", 3e-1)):
            model = export(preset, dtype)
            exact_ids, exact = greedy(host_portable(), model, qemu=False)
            base_ids, base = greedy(arm_run("armv8-a", 2), model, ("-a", "fast", "-T", "2"))
            dot_ids, dot = greedy(arm_run("armv8.2-a+dotprod", 0), model, ("-a", "fast"))
            # rows len(PROMPT) - 1 + k read the greedy tokens before step k: comparable while
            # the two agree
            agree = next((k for k in range(STEPS) if base_ids[k] != exact_ids[k]), STEPS)
            rows = len(PROMPT) + agree
            same, err = relative(dot, base), relative(base[:rows], exact[:rows])
            report.append(f"{preset} {dtype} -a fast: dotprod vs armv8-a {same:.1e}, "
                          f"vs exact {err:.1e} over {rows} positions")
            assert dot_ids == base_ids and same <= 1e-6, report[-1]
            assert 0 < err <= bound, report[-1]  # (0: -a fast changed nothing)
    print("    " + "\n    ".join(report))


def test_version_names_the_kernels():
    for arch, kernels in (("armv8-a", b"NEON kernels"),
                          ("armv8.2-a+dotprod", b"NEON kernels with the int8 dot product")):
        version = run(QEMU + [arm_run(arch, 0), "--version"]).stdout
        assert version.rstrip().endswith(b", " + kernels), version


def main():
    passed = failed = 0
    start_all = time.time()
    for name, func in list(globals().items()):
        if not name.startswith("test_") or not callable(func):
            continue
        start = time.time()
        try:
            func()
        except Exception as e:  # reported, never fatal to the run
            failed += 1
            print(f"FAIL {name} ({time.time() - start:.1f}s)\n    {type(e).__name__}: {e}")
        else:
            passed += 1
            print(f"pass {name} ({time.time() - start:.1f}s)")
        sys.stdout.flush()
    if not failed:
        remove_scratch()
    print(f"{passed} passed, {failed} failed ({time.time() - start_all:.0f}s)")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
