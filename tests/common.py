"""Helpers shared by the tests: paths, running the built programs, temporary folders."""
import os
import shutil
import subprocess
import tempfile

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
DATA = os.path.join(TESTS, "data")
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"


def program(name):
    """Path of a program built by the Makefile (`run`, `tokenize`); LLAMA3C_BIN_DIR overrides."""
    return os.path.join(os.environ.get("LLAMA3C_BIN_DIR", REPO), name)


def run(args, input=None, timeout=600, check=True):
    """Runs a command, returns CompletedProcess with bytes stdout/stderr."""
    proc = subprocess.run(args, input=input, capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stderr.decode(errors='replace')[-2000:]}")
    return proc


SCRATCH = []  # the folders scratch() made in this process


def scratch(prefix):
    """A fresh temporary folder for one test. tests/run_tests.py removes it after a run in which
    every test passed, and leaves it under /tmp for inspection when one failed."""
    folder = tempfile.mkdtemp(prefix="llama3c-" + prefix + "-")
    SCRATCH.append(folder)
    return folder


def remove_scratch():
    """Removes the folders scratch() made (a run leaves ~250 MB of models and files there)."""
    for folder in SCRATCH:
        shutil.rmtree(folder, ignore_errors=True)
    SCRATCH.clear()
