"""Tests of the tokenizer (tokenizer.c) through the `tokenize` program and a small C program.

The .tok file is written once per run by `export.py --tokenizer-only` from the vendored
tests/data/tokenizer/tokenizer.model (Meta's file) with the Llama 3 special-token names.

Gold data: tests/data/tokenizer/cases.jsonl and decode_cases.jsonl (see README.md there).
Random strings are checked against an independent reference written here: Llama 3's split
pattern itself, run by Python's backtracking `re` engine with \\p{L}, \\p{N} and \\s spelled out
as ranges (from the Unicode table embedded in tokenizer.c, which test_unicode_table checks
against the Unicode database), then tiktoken's plain O(n^2) merge loop. Bytes that are not
UTF-8 go through it as Python's "surrogateescape" lone surrogates, which is the policy
tokenizer.c documents.
"""
import base64
import json
import os
import random
import re
import struct
import subprocess
import sys
import time

import common

TOKDATA = os.path.join(common.DATA, "tokenizer")
GEN_TABLES = os.path.join(common.REPO, "tools", "gen_unicode_tables.py")
UCD = "/usr/share/unicode"
_cache = {}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def export_tok(source="tokenizer.model"):
    """Path of a .tok exported from tests/data/tokenizer/SOURCE (made once per run)."""
    if source not in _cache:
        out = os.path.join(common.scratch("tok"), "llama3.tok")
        args = [common.PYTHON, os.path.join(common.REPO, "export.py"), "--tokenizer-only", out,
                "--tokenizer", os.path.join(TOKDATA, source)]
        if source.endswith(".model"):
            args += ["--specials", "llama3"]
        proc = common.run(args, check=False)
        if proc.returncode != 0 or not os.path.exists(out):
            raise AssertionError("export.py --tokenizer-only failed (does export.py support "
                                 f"--tokenizer-only OUT --tokenizer PATH?):\n"
                                 f"{proc.stderr.decode(errors='replace')[-2000:]}")
        _cache[source] = out
    return _cache[source]


def tokenize(args, input=None, check=True, timeout=600):
    exe = common.program("tokenize")
    if not os.path.exists(exe):
        raise AssertionError(f"{exe} not built (make tokenize)")
    return common.run([exe] + list(args), input=input, check=check, timeout=timeout)


def encode_many(texts, flags=(), tok=None):
    """ids of each text (bytes) from one `tokenize --batch` run."""
    data = b"".join(t.hex().encode() + b"\n" for t in texts)
    out = tokenize([tok or export_tok(), "--batch"] + list(flags), input=data).stdout
    lines = out.decode().split("\n")
    assert len(lines) == len(texts) + 1 and lines[-1] == "", "one output line per text"
    return [[int(x) for x in line.split()] for line in lines[:-1]]


def decode_many(id_lists, utf8=False):
    """The bytes of each list of ids from one `tokenize --decode --batch` run."""
    data = "".join(" ".join(map(str, ids)) + "\n" for ids in id_lists).encode()
    args = [export_tok(), "--decode", "--batch"] + (["--utf8"] if utf8 else [])
    lines = tokenize(args, input=data).stdout.decode().split("\n")
    assert len(lines) == len(id_lists) + 1 and lines[-1] == ""
    return [bytes.fromhex(line) for line in lines[:-1]]


def load_jsonl(name):
    with open(os.path.join(TOKDATA, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def check_lists(what, inputs, got, want):
    bad = [(x, g, w) for x, g, w in zip(inputs, got, want) if g != w]
    if bad:
        x, g, w = bad[0]
        raise AssertionError(f"{what}: {len(bad)} of {len(inputs)} differ; first: {x!r}\n"
                             f"  got  {g}\n  want {w}")


# ---------------------------------------------------------------------------------------------
# Reference: the split pattern by Python's re engine, and tiktoken's merge loop
# ---------------------------------------------------------------------------------------------

def embedded_runs():
    """[(first code point, class name)] from tokenizer.c's generated table."""
    with open(os.path.join(common.REPO, "tokenizer.c"), encoding="utf-8") as f:
        text = f.read()
    runs = [(int(cp, 16), cls) for cp, cls in
            re.findall(r"\{0x([0-9A-F]{6}), CHAR_(OTHER|LETTER|NUMBER|SPACE)\}", text)]
    assert runs and runs[0][0] == 0, "no generated table in tokenizer.c"
    return runs


def class_ranges(runs, name):
    """The inside of a [...] class matching the code points of class `name`."""
    parts = []
    for k, (first, cls) in enumerate(runs):
        if cls == name:
            last = runs[k + 1][0] - 1 if k + 1 < len(runs) else 0x10FFFF
            parts.append(f"\\U{first:08x}-\\U{last:08x}")
    return "".join(parts)


def reference_pattern():
    if "pattern" not in _cache:
        runs = embedded_runs()
        L, N, S = (class_ranges(runs, c) for c in ("LETTER", "NUMBER", "SPACE"))
        # Llama 3's pattern with \p{L}, \p{N}, \s (and \S = [^\s]) written out
        pat = (rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n{L}{N}]?[{L}]+|[{N}]{{1,3}}"
               rf"| ?[^{S}{L}{N}]+[\r\n]*|[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+")
        _cache["pattern"] = re.compile(pat)
    return _cache["pattern"]


def ranks():
    if "ranks" not in _cache:
        table = {}
        with open(os.path.join(TOKDATA, "tokenizer.model"), "rb") as f:
            for line in f:
                b64, rank = line.split()
                table[base64.b64decode(b64)] = int(rank)
        _cache["ranks"] = table
    return _cache["ranks"]


def reference_bpe(piece, table):
    """tiktoken: the whole piece if it is a token, else merge the lowest-rank pair (leftmost)."""
    if piece in table:
        return [table[piece]]
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = table.get(parts[i] + parts[i + 1])
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return [table[p] for p in parts]
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def reference_encode(data):
    """ids of bytes `data` (no specials): invalid UTF-8 bytes become lone surrogates."""
    text = data.decode("utf-8", "surrogateescape")
    table = ranks()
    ids = []
    for m in reference_pattern().finditer(text):
        ids += reference_bpe(m.group().encode("utf-8", "surrogateescape"), table)
    return ids


# ---------------------------------------------------------------------------------------------
# Random text
# ---------------------------------------------------------------------------------------------

ATOMS = ["the", " the", "The", " quick", " brown", "fox", " jumps", "HELLO", "über", "naïve",
         "ſ", "'s", "'S", "'t", "'re", "'RE", "'ve", "'m", "'ll", "'LL", "'d", "'ſ", "’s", "'",
         "'x", " '", "'''", "''ll",
         "0", "7", "42", "123", "4567", "3.14", "1,000", "٣٤٥", "१२३", "Ⅻ", "½", "²",
         " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r", " \n", "\u00a0", "\u3000", "\u2028",
         "\u0085", "\u000b", "\u000c", "\u001c", "\u200b", "\ufeff",
         "!", "?", ".", "...", ",", ";", "(", ")", "[", "]", "{", "}", "<", ">", "=>", "==", "->",
         "//", "/*", "*/", "#", "$", "%", "&&", "||", "\"", "`", "~", "^", "_", "-", "--", "@",
         "<|eot_id|>", "<|begin_of_text|>", "<|", "|>",
         "日本語", "中文", "한국어", "ひらがな", "カタカナ", "𠀀𠀁", "Привет", "мир", "Ελληνικά",
         "العربية", "עברית", "हिन्दी", "বাংলা", "ภาษาไทย", "Հայերեն", "ኢትዮጵያ", "ខ្មែរ",
         "മലയാളം", "e\u0301", "a\u0308\u0304",
         "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "1️⃣", "❤️", "🤖", "\U0010ffff", "\ue000", "\ufffd",
         "\x00", "\x01", "\x7f", "Ġ", "Ċ", "ĉ"]


def random_char(rng):
    """A random code point from everywhere (no surrogates)."""
    while True:
        cp = rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0x7FF), rng.randint(0x800, 0xFFFF),
                         rng.randint(0x10000, 0x10FFFF), rng.randint(0x4E00, 0x9FFF)])
        if not 0xD800 <= cp <= 0xDFFF:
            return chr(cp)


def random_text(rng, n=None):
    n = n or rng.choice([1, 2, 3, 5, 8, 13, 21, 40])
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.75:
            out.append(rng.choice(ATOMS))
        elif r < 0.9:
            out.append(random_char(rng))
        else:
            out.append("".join(random_char(rng) for _ in range(rng.randint(2, 6))))
    return "".join(out)


def random_texts(count, seed, long=False):
    rng = random.Random(seed)
    return [random_text(rng, rng.randint(100, 300) if long else None) for _ in range(count)]


LETTERS = ["a", "e", "t", "X", "é", "ß", "ſ", "я", "Ж", "α", "ب", "ה", "क", "\u093f", "ก", "日",
           "本", "語", "한", "ひ", "𠀀", "ǅ", "ª"]
RUN_CHARS = {"letters": LETTERS, "punctuation": list("!?.,;:-_=+*/\\|<>()[]{}'\"`~^@#$%&") +
             ["…", "—", "«", "»", "→", "😀", "\u0301", "\x00"],
             "spaces": [" ", " ", " ", "\t", "\u00a0", "\u3000", "\u2009"]}


def long_piece_texts(count, seed):
    """Texts that are mostly one long pre-token (up to ~300 characters): letter runs over
    several scripts, punctuation runs, white-space runs with a newline or a word after."""
    rng = random.Random(seed)
    texts = []
    for k in range(count):
        kind = ["letters", "punctuation", "spaces"][k % 3]
        run = "".join(rng.choice(RUN_CHARS[kind]) for _ in range(rng.randint(20, 300)))
        texts.append(rng.choice(["", " ", "x"]) + run + rng.choice(["", "\n", " word", "1"]))
    return texts


def corrupt(data, rng):
    """data with a few bytes inserted, replaced or cut, so that it is usually not UTF-8."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        pos = rng.randint(0, len(b))
        junk = rng.choice([0x80, 0xBF, 0xC0, 0xC1, 0xC2, 0xE0, 0xED, 0xF0, 0xF4, 0xF5, 0xFF,
                           rng.randint(0x80, 0xFF)])
        if kind < 0.5:
            b.insert(pos, junk)
        elif kind < 0.8 and pos < len(b):
            b[pos] = junk
        else:
            del b[pos:pos + rng.randint(1, 2)]
    return bytes(b)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def test_unicode_table():
    """The table in tokenizer.c is what tools/gen_unicode_tables.py makes of Unicode 15.0."""
    if os.path.exists(os.path.join(UCD, "UnicodeData.txt")):
        common.run([common.PYTHON, GEN_TABLES, "--check", "--ucd", UCD])
        return
    # Without the Unicode database: check against Python's own (older) one for the code points
    # it assigns, and against the fixed White_Space list.
    import unicodedata
    runs = embedded_runs()
    spaces = set([*range(9, 14), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028,
                  0x2029, 0x202F, 0x205F, 0x3000])
    k = 0
    for cp in range(0x110000):
        while k + 1 < len(runs) and runs[k + 1][0] <= cp:
            k += 1
        cat = unicodedata.category(chr(cp))
        if cp in spaces:
            want = "SPACE"
        elif cat == "Cn":
            continue
        else:
            want = {"L": "LETTER", "N": "NUMBER"}.get(cat[0], "OTHER")
        assert runs[k][1] == want, \
            f"U+{cp:04X}: {runs[k][1]}, Unicode {unicodedata.unidata_version} says {want}"


def test_json_and_model_give_the_same_file():
    """export.py from tokenizer.json and from tokenizer.model (Llama 3 names) agree exactly."""
    with open(export_tok("tokenizer.model"), "rb") as a:
        with open(export_tok("tokenizer.json"), "rb") as b:
            assert a.read() == b.read(), "the two .tok files differ"


def test_cases_encode():
    """Every gold case gives exactly its ids (special text as plain text), and ids_special with
    special tokens allowed."""
    cases = load_jsonl("cases.jsonl")
    texts = [c["text"].encode("utf-8") for c in cases]
    check_lists("ids", texts, encode_many(texts), [c["ids"] for c in cases])
    special = [c for c in cases if "ids_special" in c]
    assert len(special) == 8
    texts = [c["text"].encode("utf-8") for c in special]
    check_lists("ids_special", texts, encode_many(texts, ["--special"]),
                [c["ids_special"] for c in special])
    # cases without special-token text do not change when specials are allowed
    plain = [c for c in cases if "<|" not in c["text"]]
    texts = [c["text"].encode("utf-8") for c in plain]
    check_lists("ids --special", texts, encode_many(texts, ["--special"]),
                [c["ids"] for c in plain])
    # --bos puts 128000 first
    check_lists("ids --bos", texts, encode_many(texts, ["--bos"]),
                [[128000] + c["ids"] for c in plain])


def test_cases_encode_with_json_export():
    cases = load_jsonl("cases.jsonl")
    texts = [c["text"].encode("utf-8") for c in cases]
    check_lists("ids", texts, encode_many(texts, tok=export_tok("tokenizer.json")),
                [c["ids"] for c in cases])


def test_cases_decode():
    """The ids of every case decode to its text, raw and through the streaming decoder."""
    cases = load_jsonl("cases.jsonl")
    want = [c["text"].encode("utf-8") for c in cases]
    check_lists("decode", want, decode_many([c["ids"] for c in cases]), want)
    check_lists("decode --utf8", want, decode_many([c["ids"] for c in cases], utf8=True), want)
    special = [c for c in cases if "ids_special" in c]
    want = [c["text"].encode("utf-8") for c in special]
    check_lists("decode special", want, decode_many([c["ids_special"] for c in special]), want)


def test_decode_cases():
    """decode_cases.jsonl: the exact bytes of every entry; with --utf8, Python's
    decode('utf-8', 'replace') of them (incomplete characters become U+FFFD)."""
    entries = load_jsonl("decode_cases.jsonl")
    ids = [e["ids"] for e in entries]
    want = [bytes.fromhex(e["hex"]) for e in entries]
    check_lists("raw", ids, decode_many(ids), want)
    want_utf8 = [w.decode("utf-8", "replace").encode("utf-8") for w in want]
    check_lists("utf8", ids, decode_many(ids, utf8=True), want_utf8)
    for e, w in zip(entries, want_utf8):
        if e["text"] is not None:
            assert w == e["text"].encode("utf-8"), e


def test_random_strings_match_reference():
    """3,000 short and 300 long random strings (scripts, digits, spaces, newlines, emoji,
    contractions, special-token text) and 150 long single pre-tokens: ids equal the
    reference's, and decode back exactly."""
    texts = (random_texts(3000, seed=20240418) + random_texts(300, seed=4, long=True) +
             long_piece_texts(150, seed=8))
    texts = [t.encode("utf-8") for t in texts]
    got = encode_many(texts)
    check_lists("random", texts, got, [reference_encode(t) for t in texts])
    check_lists("round trip", texts, decode_many(got), texts)


def test_long_s_contraction():
    """(?i:'s) matches "'ſ" (U+017F case-folds to s) in Rust's regex, Python's regex and re.
    No Llama 3 token holds the bytes of ſ, so this only shows through the whole-piece shortcut:
    "'ſ" + "Türkiye" (a token merging never reaches) differs from the one piece "'ſTürkiye"."""
    table = ranks()
    assert re.fullmatch(r"(?i:'s)", "'ſ")
    for text, pieces in [("it'ſ", ["it", "'ſ"]), ("'ſx", ["'ſ", "x"]),
                         ("'ſTürkiye", ["'ſ", "Türkiye"]), ("'S", ["'S"]), ("'LL", ["'LL"]),
                         ("'Re", ["'Re"]), ("'rE", ["'rE"]), ("'T", ["'T"]), ("’s", ["’s"]),
                         ("'x", ["'x"]), ("'\u212a", ["'\u212a"])]:
        want = [i for p in pieces for i in reference_bpe(p.encode("utf-8"), table)]
        assert encode_many([text.encode("utf-8")]) == [want], text
        assert reference_encode(text.encode("utf-8")) == want, text


def test_invalid_utf8():
    """Bytes that are not UTF-8: each is a character of none of the classes, and keeps its
    byte: ids equal the reference's (surrogateescape) and decode back to the same bytes."""
    handmade = [b"\x80", b"\xff", b"\xc0\xaf", b"\xe0\x80\x80", b"\xed\xa0\x80",
                b"\xf4\x90\x80\x80", b"\xf5", b"\xe2\x82", b"a\xe2\x82a", b"\xe2\x82\xe2\x82\xac",
                b"\xf0\x9f\x98",
                b" \xff\xfe", b"word\x80word", b"\x80abc", b" \x80abc", b"\xc3", b"\xc3 \xa9",
                b"12\xff34", b"  \xff", b"\n\x80\n", b"'\xff", b"'s\xff", b"\xef\xbb\xbf\xff",
                b"\xff" * 100, bytes(range(256)), bytes(range(255, -1, -1))]
    rng = random.Random(7)
    mutated = [corrupt(t.encode("utf-8"), rng) for t in random_texts(1000, seed=99)]
    texts = handmade + mutated
    assert sum(1 for t in texts if not _is_utf8(t)) > 900
    got = encode_many(texts)
    check_lists("invalid utf-8", texts, got, [reference_encode(t) for t in texts])
    check_lists("round trip", texts, decode_many(got), texts)


def _is_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_nul_bytes():
    texts = [b"\x00", b"a\x00b", b"\x00\x00\x00", b"hello\x00 world", b" \x00 ", b"\x00\n\x00",
             b"x" * 10 + b"\x00" + b"y" * 10]
    got = encode_many(texts)
    check_lists("nul", texts, got, [reference_encode(t) for t in texts])
    check_lists("round trip", texts, decode_many(got), texts)
    # binary-safe stdin, not just --batch
    data = b"a\x00b\xff\n<|eot_id|>"
    out = tokenize([export_tok()], input=data).stdout.decode().split()
    assert [int(x) for x in out] == reference_encode(data)


def test_special_tokens_only_when_allowed():
    """Special-token text typed in the input is plain text unless --special is given."""
    tok = export_tok()
    eot = b"<|eot_id|>"
    plain, allowed = encode_many([eot], tok=tok), encode_many([eot], ["--special"], tok=tok)
    assert 128009 not in plain[0] and plain == [reference_encode(eot)], plain
    assert allowed == [[128009]]
    with open(os.path.join(TOKDATA, "special_tokens.json"), encoding="utf-8") as f:
        layout = json.load(f)["layouts"]["llama3"]["tokens"]
    texts = [s["text"].encode() for s in layout]
    assert encode_many(texts, ["--special"]) == [[s["id"]] for s in layout]
    for ids in encode_many(texts):
        assert all(i < 128000 for i in ids)
    # segments between specials are encoded on their own, as tiktoken does
    cases = [b"abc<|eot_id|>def", b"  <|eot_id|>  ", b"<|eot_id|><|eot_id|>", b"x<|eot_id|",
             b"<|eot_id|>'s", b"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi",
             b"<|eom_id|>", b"<|EOT_ID|>", b"<|eot_id |>", b"<|reserved_special_token_250|>x"]
    for text in cases:
        want, rest = [], text
        while True:
            hits = [(rest.find(s["text"].encode()), s) for s in layout
                    if s["text"].encode() in rest]
            if not hits:
                want += reference_encode(rest)
                break
            at, s = min(hits, key=lambda h: h[0])
            want += reference_encode(rest[:at]) + [s["id"]]
            rest = rest[at + len(s["text"]):]
        assert encode_many([text], ["--special"], tok=tok) == [want], text
        assert encode_many([text], tok=tok) == [reference_encode(text)], text
    # the CLI with a TEXT argument
    assert tokenize([tok, "--bos", "--special", "Hi<|eot_id|>"]).stdout == b"128000 13347 128009\n"
    assert tokenize([tok, "<|eot_id|>"]).stdout.decode().split() == [str(i) for i in plain[0]]


def _special_reference(text, specials):
    """Byte ids of text, cut at special tokens: the leftmost first, the longest of those that
    start there (ids 256 + index)."""
    ids, pos = [], 0
    while pos < len(text):
        here = [(len(s), i) for i, s in enumerate(specials) if text.startswith(s, pos)]
        if here:
            length, i = max(here)
            ids.append(256 + i)
            pos += length
        else:
            ids.append(text[pos])
            pos += 1
    return ids


def test_special_tokens_overlapping():
    """Specials that are prefixes, suffixes and middles of one another, found in random texts
    exactly as the reference finds them (leftmost, then longest); their ids by text."""
    rng = random.Random(21)
    folder = common.scratch("specials")
    singles = [bytes([b]) for b in range(256)]
    for round_ in range(6):
        alphabet = b"<|ab>"[:2 + round_ % 4]
        specials = sorted({bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 7)))
                           for _ in range(rng.randint(1, 40))})
        rng.shuffle(specials)
        tok = os.path.join(folder, f"s{round_}.tok")
        with open(tok, "wb") as f:
            f.write(_tok_bytes(singles, specials))
        texts = [bytes(rng.choice(alphabet + b"x ") for _ in range(rng.randint(0, 60)))
                 for _ in range(300)]
        texts += specials + [s + s for s in specials] + [s[1:] + s + s[:-1] for s in specials]
        got = encode_many(texts, ["--special"], tok=tok)
        check_lists(f"specials {specials[:5]}...", texts, got,
                    [_special_reference(t, specials) for t in texts])
    # and long ones: the leftmost start wins over a longer special starting later
    specials = [b"<" * k + b">" for k in range(1, 300)] + [b"<<x", b"x" * 500]
    tok = os.path.join(folder, "long.tok")
    with open(tok, "wb") as f:
        f.write(_tok_bytes(singles, specials))
    texts = [b"<" * 1000 + b">", b"<" * 100 + b"x" * 600 + b"<" * 299 + b">" + b"<<", b"<<x" * 50]
    got = encode_many(texts, ["--special"], tok=tok)
    check_lists("long specials", texts, got, [_special_reference(t, specials) for t in texts])


def _timed_encode(data):
    start = time.time()
    out = tokenize([export_tok()], input=data, timeout=120).stdout
    return time.time() - start, [int(x) for x in out.split()]


def test_long_inputs_linear_time():
    """A 10 MB single line, 1,000,000 spaces and a 2 MB one-piece word: no crash, no hang (each
    takes a few seconds at most; superlinear work would run into the 120 s timeout, which is a
    hang guard, not a speed test: the merge step is O(n log n)), and exact round trips."""
    rng = random.Random(3)
    words = random_texts(200, seed=5)
    line = []
    size = 0
    while size < 10_000_000:
        w = rng.choice(words).replace("\n", " ").replace("\r", " ").replace("\u2028", " ")
        line.append(w)
        size += len(w.encode("utf-8"))
    inputs = {"10 MB line": " ".join(line).encode("utf-8")[:10_000_000],
              "1,000,000 spaces": b" " * 1_000_000,
              "2 MB of 'a'": b"a" * 2_000_000,
              "1 MB of one CJK word": ("漢字" * 170_000).encode("utf-8")}
    for name, data in inputs.items():
        seconds, ids = _timed_encode(data)
        print(f"    {name}: {seconds:.2f} s")
        back = tokenize([export_tok(), "--decode"], input=" ".join(map(str, ids)).encode()).stdout
        assert back == data, f"{name}: round trip differs"
    # 1,000,000 spaces: the same ids as the reference would give for a shorter run, scaled:
    # \s+(?!\S) takes the whole run at the end of the text, and merging makes 16-space tokens
    seconds, ids = _timed_encode(b" " * 1_000_000)
    assert len(ids) < 1_000_000 // 8, len(ids)
    assert _timed_encode(b" " * 1000)[1] == reference_encode(b" " * 1000)


def _tok_bytes(regular, specials):
    parts = [struct.pack("<4sIII", b"L3TK", 1, len(regular) + len(specials), len(specials))]
    for token in list(regular) + list(specials):
        parts.append(struct.pack("<I", len(token)) + token)
    return b"".join(parts)


def test_malformed_tok_files():
    """Every kind of broken .tok file is refused with one line on stderr, exit status 1."""
    folder = common.scratch("badtok")
    with open(export_tok(), "rb") as f:
        good = f.read()
    singles = [bytes([b]) for b in range(256)]
    small = _tok_bytes(singles + [b"ab"], [b"<|end|>"])
    n = struct.unpack_from("<I", good, 8)[0]
    variants = {
        "empty": (b"", "too short"),
        "header only half": (good[:10], "too short"),
        "bad magic": (b"L3TX" + good[4:], "magic"),
        "llama2.c tokenizer": (struct.pack("<I", 128) + good[4:], "magic"),
        "version 2": (good[:4] + struct.pack("<I", 2) + good[8:], "version"),
        "n_special > n_tokens": (good[:12] + struct.pack("<I", n + 1) + good[16:], "n_special"),
        "huge n_tokens": (good[:8] + struct.pack("<I", 0xFFFFFFFF) + good[12:], "truncated"),
        "one token too few": (good[:8] + struct.pack("<I", n - 1) + good[12:], "trailing"),
        "one token too many": (good[:8] + struct.pack("<I", n + 1) + good[12:], "truncated"),
        "cut in a length": (good[:18], "truncated"),
        "cut in the bytes": (good[:len(good) // 2], "truncated"),
        "last byte missing": (good[:-1], "truncated"),
        "trailing byte": (good + b"\x00", "trailing"),
        "length past the end": (small[:16] + struct.pack("<I", 1 << 30) + small[20:], "truncated"),
        "empty regular token": (_tok_bytes(singles + [b""], []), "empty"),
        "empty special token": (_tok_bytes(singles, [b""]), "empty"),
        "duplicate regular token": (_tok_bytes(singles + [b"ab", b"ab"], []), "same bytes"),
        "duplicate single byte": (_tok_bytes(singles + [b"a"], []), "same bytes"),
        "duplicate special": (_tok_bytes(singles, [b"<|x|>", b"<|x|>"]), "same bytes"),
        "missing single byte": (_tok_bytes(singles[:200] + singles[201:] + [b"ab"], []), "0xC8"),
        "no tokens": (_tok_bytes([], []), "single byte"),
    }
    for name, (data, needle) in variants.items():
        path = os.path.join(folder, name.replace(" ", "_") + ".tok")
        with open(path, "wb") as f:
            f.write(data)
        proc = tokenize([path, "hello"], check=False)
        err = proc.stderr.decode(errors="replace")
        assert proc.returncode == 1, f"{name}: exit {proc.returncode}"
        assert proc.stdout == b"", name
        assert err.count("\n") == 1 and path in err and needle in err, f"{name}: {err!r}"
    # a minimal well-formed file loads, and a special may equal nothing else
    ok = os.path.join(folder, "small.tok")
    with open(ok, "wb") as f:
        f.write(small)
    assert tokenize([ok, "abab"]).stdout == b"256 256\n"
    # no <|begin_of_text|>: --bos is an error, not a wrong id
    proc = tokenize([ok, "--bos", "ab"], check=False)
    assert proc.returncode == 1 and b"begin_of_text" in proc.stderr
    proc = tokenize([os.path.join(folder, "does-not-exist.tok"), "x"], check=False)
    assert proc.returncode == 1 and b"cannot open" in proc.stderr


def test_cli_errors():
    """Bad command lines and ids: one line on stderr, exit status 1, nothing on stdout."""
    tok = export_tok()
    bad = [[], [tok, "--nope", "x"], [tok, "a", "b"], [tok, "--decode", "abc"],
           [tok, "--decode", "-1"], [tok, "--decode", "128256"], [tok, "--decode", "99999999999"],
           [tok, "--decode", "12x"], [tok, "--decode", ""], [tok, "--decode", "--bos", "1"],
           [tok, "--utf8", "x"], [tok, "--batch", "x"], ["--bos", tok]]
    for args in bad:
        proc = tokenize(args, check=False)
        err = proc.stderr.decode(errors="replace")
        assert proc.returncode == 1, f"{args}: exit {proc.returncode}"
        assert err.startswith("tokenize: ") and err.count("\n") == 1, f"{args}: {err!r}"
        assert proc.stdout == b"", args
    for args, data in [([tok, "--batch"], b"zz\n"), ([tok, "--batch"], b"abc\n"),
                       ([tok, "--decode"], b"1 2 x"), ([tok, "--decode"], b"1\x002"),
                       ([tok, "--decode", "--batch"], b"1\n999999\n")]:
        proc = tokenize(args, input=data, check=False, timeout=20)
        assert proc.returncode == 1 and proc.stderr.startswith(b"tokenize: "), (args, proc.stderr)


def test_cli_decode_and_stdin():
    tok = export_tok()
    assert tokenize([tok, "--decode", "9906", "1917", "128009"]).stdout == b"Hello world<|eot_id|>"
    assert tokenize([tok, "--decode"], input=b" 9906\n1917\t").stdout == b"Hello world"
    assert tokenize([tok, "--decode"], input=b"").stdout == b""
    assert tokenize([tok], input=b"").stdout == b"\n"
    assert tokenize([tok, ""]).stdout == b"\n"
    # a character split over tokens: raw bytes are exact; --utf8 holds the incomplete
    # character back, and the flush at the end turns it into one U+FFFD
    char = "\U00020001".encode()
    ids = [str(i) for i in reference_encode(char)]
    assert len(ids) > 1
    prefix = tokenize([tok, "--decode"] + ids[:-1]).stdout
    assert 0 < len(prefix) < len(char) and char.startswith(prefix)
    assert tokenize([tok, "--decode", "--utf8"] + ids[:-1]).stdout == "\ufffd".encode()
    assert tokenize([tok, "--decode", "--utf8"] + ids).stdout == char
    assert tokenize([tok, "--", "--bos"]).stdout.decode().split() == \
        [str(i) for i in reference_encode(b"--bos")]


API_TEST_C = r"""
#include "tokenizer.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond) \
    do { if (!(cond)) { printf("FAIL line %d: %s\n", __LINE__, #cond); return 1; } } while (0)

static int hexval(int c) { return c <= '9' ? c - '0' : c - 'a' + 10; }

int main(int argc, char **argv)
{
    char err[256];
    CHECK(tokenizer_load("/nonexistent/x.tok", err, sizeof err) == NULL && strstr(err, "x.tok"));
    CHECK(tokenizer_load("/nonexistent/x.tok", NULL, 0) == NULL);
    Tokenizer *t = tokenizer_load(argv[1], err, sizeof err);
    CHECK(t != NULL);
    CHECK(tokenizer_vocab_size(t) == 128256);
    CHECK(tokenizer_special_id(t, "<|eot_id|>") == 128009);
    CHECK(tokenizer_special_id(t, "<|begin_of_text|>") == 128000);
    CHECK(tokenizer_special_id(t, "<|eot_id|") == -1 && tokenizer_special_id(t, "") == -1);
    CHECK(tokenizer_special_id(t, "Hello") == -1);
    CHECK(tokenizer_is_special(t, 128000) && tokenizer_is_special(t, 128255));
    CHECK(!tokenizer_is_special(t, 127999) && !tokenizer_is_special(t, 128256) &&
          !tokenizer_is_special(t, -1));
    size_t len = 99;
    CHECK(tokenizer_piece(t, -1, &len) == NULL && len == 0);
    CHECK(tokenizer_piece(t, 128256, &len) == NULL && len == 0);
    const unsigned char *p = tokenizer_piece(t, 128009, &len);
    CHECK(p && len == 10 && memcmp(p, "<|eot_id|>", 10) == 0);
    p = tokenizer_piece(t, 9906, &len);
    CHECK(p && len == 5 && memcmp(p, "Hello", 5) == 0);

    /* encode appends; errors leave the list as it was */
    TokenList ids = {0};
    CHECK(tokenizer_encode(t, "Hello", 5, 0, &ids) == TOKENIZER_OK && ids.count == 1);
    CHECK(tokenizer_encode(t, "Hello<|eot_id|>", 15, TOKENIZER_ADD_BOS | TOKENIZER_ALLOW_SPECIAL,
                           &ids) == TOKENIZER_OK);
    CHECK(ids.count == 4 && ids.ids[0] == 9906 && ids.ids[1] == 128000 && ids.ids[2] == 9906 &&
          ids.ids[3] == 128009);
    CHECK(tokenizer_encode(t, "a\0b", 3, 0, &ids) == TOKENIZER_OK && ids.count == 7);
    CHECK(token_list_push(&ids, 128009) == TOKENIZER_OK && ids.count == 8 && ids.ids[7] == 128009);
    CHECK(tokenizer_encode(t, "", 0, 0, &ids) == TOKENIZER_OK && ids.count == 8);
    token_list_free(&ids);
    CHECK(ids.ids == NULL && ids.count == 0);

    /* the streaming decoder, fed one byte at a time: stdin lines of hex; prints hex */
    static char line[1 << 16];
    while (fgets(line, sizeof line, stdin)) {
        size_t n = strcspn(line, "\n");
        Utf8Decoder d = {0};
        unsigned char out[UTF8_DECODER_OUT_MAX(1)];
        for (size_t i = 0; i + 1 < n; i += 2) {
            unsigned char b = (unsigned char)(hexval(line[i]) * 16 + hexval(line[i + 1]));
            size_t k = utf8_decoder_feed(&d, &b, 1, out);
            for (size_t j = 0; j < k; j++) printf("%02x", out[j]);
        }
        size_t k = utf8_decoder_flush(&d, out);
        for (size_t j = 0; j < k; j++) printf("%02x", out[j]);
        CHECK(d.n_pending == 0);
        printf("\n");
    }
    tokenizer_free(t);
    tokenizer_free(NULL);
    printf("OK\n");
    return 0;
}
"""


def test_c_api():
    """The C API: load errors, specials, pieces, append semantics, and the streaming UTF-8
    decoder fed byte by byte equals Python's decode('utf-8', 'replace')."""
    folder = common.scratch("tokapi")
    src = os.path.join(folder, "api_test.c")
    exe = os.path.join(folder, "api_test")
    with open(src, "w") as f:
        f.write(API_TEST_C)
    cc = os.environ.get("CC", "cc")
    common.run([cc, "-std=c11", "-O1", "-Wall", "-Wextra", "-I", common.REPO, "-o", exe, src,
                os.path.join(common.REPO, "tokenizer.c")])
    rng = random.Random(11)
    samples = [b"", b"\xf0\x9f\x98", b"\xf0\x9f\x98\x80", b"\xe0\x80", b"\xed\xa0\x80",
               b"\xf4\x90", b"\xc2", b"\xc2\xc2\xa9", b"\xff\xfe\xfd", b"a\x80b",
               b"\xf0\x90\x80\x41", b"\xe2\x82\xac\xe2\x82"]
    samples += [corrupt(t.encode("utf-8"), rng) for t in random_texts(500, seed=12)]
    samples += [bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 30))) for _ in range(500)]
    out = common.run([exe, export_tok()], input=b"".join(s.hex().encode() + b"\n" for s in samples))
    lines = out.stdout.decode().split("\n")
    assert lines[-2:] == ["OK", ""], out.stdout.decode()[-500:]
    got = [bytes.fromhex(x) for x in lines[:-2]]
    want = [s.decode("utf-8", "replace").encode("utf-8") for s in samples]
    check_lists("utf8 decoder", samples, got, want)
