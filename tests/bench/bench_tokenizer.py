#!/usr/bin/env python3
"""Tokenizer benchmark: encode throughput on ~10 MB of mixed text, and load time.

    tests/bench/bench_tokenizer.py [--mb 10] [--runs 3] [--loads 11]

Uses ./tokenize (built by `make tokenize`) and a .tok written by export.py from
tests/data/tokenizer/tokenizer.model. The text is generated deterministically (fixed seed):
English prose, code, CJK, Cyrillic, Arabic, Devanagari, Greek, Thai, Hangul, emoji, digit runs
and white-space runs, in lines of varying length. Times come from `tokenize --time`, which
measures inside the process: tokenizer_load, and the tokenizer_encode call alone
(single-threaded; reading stdin and printing ids are not counted).
"""
import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
sys.path.insert(0, HERE)
import common  # noqa: E402

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there been one all we their has would when if "
         "so no will more can who said about what out time up into only some could them other "
         "than then now look people my made over did down way find use may water long little "
         "very after words called just where most know through back much before go good new "
         "write our used me man too any day same right tokenizer language model inference "
         "however quickly Wednesday don't it's we're they've I'm you'll she'd").split()

CODE = [
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < n; i++) {\n\tsum += x[i] * w[i];\n}\n",
    "const result = await fetch(`https://example.com/api/v1/items?id=${id}`);\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n"
    "    println!(\"{:?}\", v);\n}\n",
    "<div class=\"container\"><p>Hello &amp; welcome!</p></div>\n",
    "{\"name\": \"llama3.c\", \"version\": [1, 2, 3], \"ok\": true, \"ratio\": 0.125}\n",
    "    if (ptr == NULL) { fprintf(stderr, \"error: %s\\n\", strerror(errno)); return -1; }\n",
]

SCRIPTS = [  # (first, last) code point ranges of letters
    (0x4E00, 0x9FA5),   # CJK
    (0x3041, 0x3096),   # Hiragana
    (0xAC00, 0xD7A3),   # Hangul
    (0x0430, 0x044F),   # Cyrillic
    (0x0627, 0x064A),   # Arabic
    (0x0905, 0x0939),   # Devanagari
    (0x03B1, 0x03C9),   # Greek
    (0x0E01, 0x0E2E),   # Thai
]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧", "🎉", "❤️", "🇫🇷", "1️⃣", "🤖"]


def prose(rng):
    words = [rng.choice(WORDS) for _ in range(rng.randint(5, 30))]
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice([".", "!", "?", ",", ";", ":"]) + " "


def script_text(rng):
    lo, hi = rng.choice(SCRIPTS)
    n_words = rng.randint(1, 8)
    if lo == 0x4E00 or lo == 0x3041:   # no spaces between words
        return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(5, 40))) + "。"
    return " ".join("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(2, 9)))
                    for _ in range(n_words)) + ". "


def numbers(rng):
    count = rng.randint(1, 6)
    return " ".join(str(rng.randint(0, 10 ** rng.randint(1, 12))) for _ in range(count)) + " "


def whitespace(rng):
    return rng.choice([" " * rng.randint(2, 40), "\n\n", "\t\t", "\r\n", " \n  ", "\u3000",
                       "\u00a0"])


def mixed_text(n_bytes, seed=1234):
    rng = random.Random(seed)
    makers = [(prose, 40), (lambda r: r.choice(CODE), 12), (script_text, 25), (numbers, 8),
              (whitespace, 8), (lambda r: r.choice(EMOJI) + " ", 4),
              (lambda r: "\n", 3)]
    funcs = [f for f, _ in makers]
    weights = [w for _, w in makers]
    parts, size = [], 0
    while size < n_bytes:
        piece = rng.choices(funcs, weights)[0](rng).encode("utf-8")
        parts.append(piece)
        size += len(piece)
    return b"".join(parts)[:n_bytes].decode("utf-8", "ignore").encode("utf-8")


def make_tok(folder):
    out = os.path.join(folder, "llama3.tok")
    common.run([common.PYTHON, os.path.join(common.REPO, "export.py"), "--tokenizer-only", out,
                "--tokenizer", os.path.join(common.DATA, "tokenizer", "tokenizer.model"),
                "--specials", "llama3"])
    return out


def timed(args, input):
    proc = common.run(args, input=input)
    fields = proc.stderr.decode().split()
    return float(fields[1]), float(fields[3]), proc.stdout


def main(argv):
    p = argparse.ArgumentParser(description="llama3.c tokenizer benchmark")
    p.add_argument("--mb", type=float, default=10.0, help="megabytes of text (default 10)")
    p.add_argument("--runs", type=int, default=3, help="encode runs, the median is shown")
    p.add_argument("--loads", type=int, default=11, help="load runs, the median is shown")
    args = p.parse_args(argv)
    exe = common.program("tokenize")
    if not os.path.exists(exe):
        sys.exit(f"{exe} not found: run `make tokenize` first")
    folder = tempfile.mkdtemp(prefix="llama3c-bench-")
    tok = make_tok(folder)
    text = mixed_text(int(args.mb * 1e6))
    loads = [timed([exe, tok, "--time", ""], None)[0] for _ in range(args.loads)]
    encodes = []
    n_tokens = 0
    for _ in range(args.runs):
        _, ms, out = timed([exe, tok, "--time"], text)
        encodes.append(ms)
        n_tokens = len(out.split())
    ms = statistics.median(encodes)
    print(f"text: {len(text) / 1e6:.2f} MB mixed (prose, code, CJK, other scripts, emoji, digits, "
          f"white space), {n_tokens} tokens ({len(text) / max(n_tokens, 1):.2f} bytes/token)")
    print(f"encode: {len(text) / 1e6 / (ms / 1e3):.1f} MB/s single-threaded "
          f"(median of {args.runs}: {ms:.0f} ms)")
    print(f"load: {statistics.median(loads):.1f} ms (median of {args.loads} loads of "
          f"{os.path.getsize(tok)} bytes)")
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
