"""README.md is a user's document: short, its commands run as written, its links lead somewhere.

Every command line in README's ```sh blocks that runs `run`, `runomp` or export.py has each of
its flags checked against what the program itself documents (`run -h`, `export.py --help`), so
a renamed or removed flag cannot linger in the README."""
import os
import re
import shlex

from common import PYTHON, REPO, program, run

README = os.path.join(REPO, "README.md")
MAX_LINES = 250
RUN_PROGRAMS = {"run", "runomp"}  # ./run, ./runomp, or on the PATH


def readme_text():
    with open(README, encoding="utf-8") as f:
        return f.read()


def sh_commands(text):
    """The command lines of text's ```sh blocks: backslash continuations joined, comments kept
    for shlex to drop."""
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M):
        pending = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            commands.append(pending + line)
            pending = ""
        if pending:
            commands.append(pending)
    return [c for c in commands if c.strip()]


def simple_commands(line):
    """line split into its simple commands (at |, &&, ||, ;), each a list of words."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, words = [], []
    for word in lexer:
        if word and all(c in "|&;()<>" for c in word):
            commands.append(words)
            words = []
        else:
            words.append(word)
    commands.append(words)
    return [w for w in commands if w]


def is_number(word):
    try:
        float(word)
        return True
    except ValueError:
        return False


def flags_by_program(text):
    """{"run": {flag, ...}, "export.py": {flag, ...}} from text's sh blocks."""
    found = {"run": set(), "export.py": set()}
    for line in sh_commands(text):
        for words in simple_commands(line):
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                words = words[1:]  # VAR=value before the command
            if not words:
                continue
            name = os.path.basename(words[0])
            if name in ("python3", "python") and len(words) > 1:
                words = words[1:]
                name = os.path.basename(words[0])
            key = "run" if name in RUN_PROGRAMS else name if name == "export.py" else None
            if key is None:
                continue
            for word in words[1:]:
                if word.startswith("-") and len(word) > 1 and not is_number(word):
                    found[key].add(word.split("=", 1)[0])
    return found


def documented(flag, help_text):
    """flag appears in help_text as a whole flag: not as part of a longer one."""
    return re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", help_text) is not None


def help_texts():
    run_help = run([program("run"), "-h"]).stdout.decode()
    export_help = run([PYTHON, os.path.join(REPO, "export.py"), "--help"]).stdout.decode()
    return {"run": run_help, "export.py": export_help}


def undocumented_flags(text, helps):
    return sorted(f"{key} {flag}" for key, flags in flags_by_program(text).items()
                  for flag in flags if not documented(flag, helps[key]))


def test_readme_is_short():
    lines = readme_text().count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines, at most {MAX_LINES}: move detail to docs/"


def test_readme_flags_exist():
    text = readme_text()
    helps = help_texts()
    flags = flags_by_program(text)
    # the extraction itself: README's quick path uses these, so finding none means a parse bug
    assert {"-m", "-y", "-i"} <= flags["run"], flags
    assert {"--hf", "--dtype", "--gguf"} <= flags["export.py"], flags
    assert undocumented_flags(text, helps) == [], undocumented_flags(text, helps)
    # and the check catches a flag that does not exist, for each program and spelling
    for bogus, expect in (("./runomp m.bin --no-such-flag 3", "run --no-such-flag"),
                          ("cat p | run m.bin -Q", "run -Q"),
                          ("/usr/bin/python3 export.py o.bin --hf d --dtype=bf16 --fp8", "export.py --fp8"),
                          ("X=1 python3 export.py o.bin \\\n    --quant q8", "export.py --quant")):
        assert undocumented_flags(text + "```sh\n" + bogus + "\n```\n", helps) == [expect], bogus


def prose(text):
    """text without its code blocks and inline code spans: the words it says to the reader."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def test_readme_has_no_history():
    # figures are current and name their CPU; no 'this session', 'the previous session'
    words = re.findall(r"\bsessions?\b", prose(readme_text()), flags=re.I)
    assert words == [], f"README.md's prose says {words}: a user's document has no sessions"


def missing_links(path, text):
    """The relative link targets of a Markdown file (path) that do not exist."""
    folder = os.path.dirname(path)
    return sorted(t for t in re.findall(r"\]\(([^)#\s]+)", text)
                  if "://" not in t and not os.path.exists(os.path.join(folder, t)))


def test_readme_links_exist():
    text = readme_text()
    docs = set(re.findall(r"\bdocs/[\w.-]+\.md\b", text))  # linked or named in the prose
    assert {"docs/usage.md", "docs/formats.md", "docs/performance.md",
            "docs/hostile-input.md"} <= docs, docs
    missing = sorted(d for d in docs if not os.path.isfile(os.path.join(REPO, d)))
    assert missing == [], f"README.md names missing files: {missing}"
    assert missing_links(README, text) == [], missing_links(README, text)
    assert missing_links(README, "[x](docs/no-such.md)") == ["docs/no-such.md"]


def test_docs_flags_and_links():
    """docs/*.md are held to the same: their commands' flags exist, their links lead somewhere."""
    helps = help_texts()
    folder = os.path.join(REPO, "docs")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".md"):
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            assert undocumented_flags(text, helps) == [], (name, undocumented_flags(text, helps))
            assert missing_links(path, text) == [], (name, missing_links(path, text))
