#!/usr/bin/env python3
"""The llama3.c test runner: `make test` runs it; the last line reads `N passed, N failed`.

Every tests/test_*.py module is imported and each of its functions named test_* is run in file
order. A test passes when it returns, fails when it raises. Each result line starts with
[N/total]. Arguments filter tests by substring of "module.function" (e.g. `tests/run_tests.py
tokenizer`).
"""
import importlib.util
import os
import sys
import time
import traceback

import common  # the tests' helpers: scratch() lists the folders they made

HERE = os.path.dirname(os.path.abspath(__file__))


def discover():
    for name in sorted(os.listdir(HERE)):
        if name.startswith("test_") and name.endswith(".py"):
            path = os.path.join(HERE, name)
            spec = importlib.util.spec_from_file_location(name[:-3], path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            funcs = [(fname, f) for fname, f in vars(module).items()
                     if fname.startswith("test_") and callable(f)]
            funcs.sort(key=lambda item: item[1].__code__.co_firstlineno)
            for fname, f in funcs:
                yield name[:-3] + "." + fname, f


def main(argv):
    sys.path.insert(0, HERE)
    filters = argv[1:]
    passed = failed = 0
    chosen = [(name, func) for name, func in discover()
              if not filters or any(f in name for f in filters)]
    for number, (name, func) in enumerate(chosen, 1):
        done = f"[{number:{len(str(len(chosen)))}d}/{len(chosen)}]"
        start = time.time()
        try:
            func()
        except Exception:  # a failing test is reported, never fatal to the run
            failed += 1
            print(f"{done} FAIL {name} ({time.time() - start:.1f}s)")
            print("    " + traceback.format_exc().strip().replace("\n", "\n    "))
        else:
            passed += 1
            print(f"{done} pass {name} ({time.time() - start:.1f}s)")
        sys.stdout.flush()
    if failed:
        print(f"scratch folders kept for inspection: {' '.join(common.SCRATCH)}")
    else:
        common.remove_scratch()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
