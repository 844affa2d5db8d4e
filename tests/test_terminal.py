"""Chat and generation on a real terminal (a pseudo-terminal from Python's pty module): the
line editor's keys, bracketed paste, continuation lines, Ctrl-C in a reply and at the prompt,
a context that slides, and the terminal given back as it was. Every session runs with -o ids,
so that the ids fed for each turn are checked, not only what is drawn."""
import json
import os
import pty
import re
import signal
import subprocess
import termios
import threading
import time

from common import program, scratch
from test_chat import BOS, EOT, assistant_header, check_dialog, message, model

WORK = scratch("terminal")
READY = b"\x1b[?2004h"  # the editor turns bracketed paste on when it starts reading a message
DONE = b"\x1b[?2004l"   # ... and off when it gives the terminal back
TIMEOUT = 300           # seconds to wait for any one thing: generous, for a busy machine
LEFT, RIGHT, UP, DOWN = b"\x1b[D", b"\x1b[C", b"\x1b[A", b"\x1b[B"
HOME, END, BACKSPACE = b"\x1b[H", b"\x1b[F", b"\x7f"
CTRL_C, CTRL_D, CTRL_U = b"\x03", b"\x04", b"\x15"


class Terminal:
    """A program on a pseudo-terminal (stdin and stdout; stderr goes to a file), with a thread
    that drains everything it draws."""

    def __init__(self, *args):
        self.err_path = os.path.join(WORK, f"stderr-{time.monotonic_ns()}")
        argv = [program("runomp"), *args]
        pid, fd = pty.fork()
        if pid == 0:  # the child: the terminal is its stdin, stdout and controlling terminal
            try:
                err = os.open(self.err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(err, 2)
                # Ctrl-C must not flush output the test has not read yet (ids it checks)
                attrs = termios.tcgetattr(0)
                attrs[3] |= termios.NOFLSH
                termios.tcsetattr(0, termios.TCSANOW, attrs)
                os.execv(argv[0], argv)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.out = bytearray()
        self.cond = threading.Condition()
        self.closed = False
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self):
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: the program is gone
                chunk = b""
            with self.cond:
                if not chunk:
                    self.closed = True
                    self.cond.notify_all()
                    return
                self.out += chunk
                self.cond.notify_all()

    def wait_for(self, pattern, count=1):
        """Waits until pattern (bytes or a compiled regex) occurs `count` times in the output."""
        def seen():
            if isinstance(pattern, bytes):
                return self.out.count(pattern) >= count
            return len(pattern.findall(self.out)) >= count
        with self.cond:
            ok = self.cond.wait_for(lambda: seen() or self.closed, timeout=TIMEOUT)
            assert ok and seen(), f"never saw {pattern!r} x{count}: {bytes(self.out[-800:])!r}"

    def send(self, data):
        while data:
            data = data[os.write(self.fd, data):]

    def finish(self):
        """Waits for the program to end; returns (exit status, output, stderr)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            assert time.monotonic() < deadline, "the program did not end"
            time.sleep(0.05)
        self.reader.join(TIMEOUT)
        self.final_modes = termios.tcgetattr(self.fd)[3]  # the local modes it left behind
        os.close(self.fd)
        with open(self.err_path, "rb") as f:
            err = f.read()
        return os.waitstatus_to_exitcode(status), bytes(self.out), err


IN = re.compile(rb"in:((?: \d+)*)\r\n")
OUT = re.compile(rb"out:((?: \d+)*)\r\n")
OUT_STARTED = re.compile(rb"out: \d+")


def turns(output):
    """[(ids fed, ids generated)] per turn, from what -o ids printed on the terminal."""
    ins = [[int(t) for t in m.split()] for m in IN.findall(output)]
    outs = [[int(t) for t in m.split()] for m in OUT.findall(output)]
    assert len(ins) == len(outs), (ins, outs)
    return list(zip(ins, outs))


def chat(*extra):
    return Terminal(model()[0], "-m", "chat", "-o", "ids", "-t", "0", *extra)


def closing(reply):
    """What the next turn feeds first: the reply's last token (sampled, not yet fed) unless it
    was the end token, then the <|eot_id|> that closes it."""
    return ([] if reply and reply[-1] == EOT else reply[-1:]) + [EOT]


def check_restored(term, output, err, status):
    assert status == 0, err
    assert term.final_modes & termios.ICANON and term.final_modes & termios.ECHO
    assert output.count(READY) == output.count(DONE) and output.rfind(DONE) > output.rfind(READY)
    assert re.search(rb"(^|\n)prompt: \d+ tokens", err), err  # the stats line, on its own line


def test_editing_keys_and_history():
    term = chat("-n", "2")
    unknown = b"\x1b[15~\x1bOP\x1bx\x1b[2J\x1b[1;5Z"  # F5, F1, Alt-x, erase screen, ...: dropped
    typed = [
        # arrows, Home/End, Backspace, a 2-byte character the cursor steps over whole
        b"abc" + LEFT + LEFT + b"X" + HOME + RIGHT + b"S" + END + b"E" + BACKSPACE
        + b" caf\xc3\xa9" + LEFT + b"Z" + unknown + b"\r",
        # Ctrl-U, Delete, and Up then Down give the draft back
        b"garbage" + CTRL_U + b"draXft" + LEFT * 3 + b"\x1b[3~" + UP + DOWN + b"!\r",
        UP + UP + BACKSPACE + b"\r",  # the first message again, less its last character
    ]
    sent = ["aSXbc cafZ\u00e9", "draft!", "aSXbc cafZ"]
    for i, keys in enumerate(typed):
        term.wait_for(READY, i + 1)
        term.send(keys)
    term.wait_for(READY, len(typed) + 1)
    term.send(CTRL_D)  # on an empty message: the end of the session
    status, output, err = term.finish()
    check_restored(term, output, err, status)
    got = turns(output)
    assert len(got) == 3
    assert got[0][0] == [BOS] + message("user", sent[0]) + assistant_header()
    for (fed, _), (_, previous), text in zip(got[1:], got, sent[1:]):
        assert fed == closing(previous) + message("user", text) + assistant_header()


def test_paste_and_continuation():
    # 100 KB pasted with newlines as a terminal sends them (\r; one \r\n), and an escape
    # sequence inside: one message, the sequence dropped
    lines = ["x" + " " * 998 + f"y{i}" for i in range(100)]
    pasted = "\r".join(lines[:50]) + "\r\n" + "\r".join(lines[50:])
    pasted = pasted.replace("y7", "y\x1b[31m7")
    assert len(pasted) > 100_000
    term = chat("-n", "2", "-c", "4096")
    term.wait_for(READY)
    term.send(b"first line\\\r  second\\\rthird\r")  # a trailing backslash continues
    term.wait_for(READY, 2)
    term.send(b"\x1b[200~" + pasted.encode() + b"\x1b[201~" + b" typed after\r")
    term.wait_for(READY, 3)
    term.send(CTRL_D)
    status, output, err = term.finish()
    check_restored(term, output, err, status)
    got = turns(output)
    assert len(got) == 2
    assert got[0][0] == [BOS] + message("user", "first line\n  second\nthird") + assistant_header()
    want = "\n".join(lines) + " typed after"
    assert got[1][0] == closing(got[0][1]) + message("user", want) + assistant_header()


def strip_echo(output):
    """The terminal echoes ^C where Ctrl-C interrupts a reply: between two ids."""
    return output.replace(b"^C", b"")


def test_ctrl_c_in_a_reply_and_at_the_prompt():
    # -e 0 -n 0 and the model's whole context: a reply that only Ctrl-C ends
    term = chat("-n", "0", "-e", "0", "-c", "131072")
    term.wait_for(READY)
    term.send(b"Tell me everything\r")
    term.wait_for(OUT_STARTED)
    term.send(CTRL_C)  # stops the reply: back to the prompt
    term.wait_for(READY, 2)
    term.send(b"And then?\r")
    term.wait_for(OUT_STARTED, 2)
    term.send(CTRL_C)
    term.wait_for(READY, 3)
    term.send(CTRL_C)  # at the prompt: the end of the session, status 0, the stats line
    status, output, err = term.finish()
    check_restored(term, output, err, status)
    got = turns(strip_echo(output))
    assert len(got) == 2 and got[0][1] and got[1][1]
    assert got[0][0] == [BOS] + message("user", "Tell me everything") + assistant_header()
    # the partial reply stays in the dialog, closed by <|eot_id|>
    assert got[1][0] == [got[0][1][-1], EOT] + message("user", "And then?") + assistant_header()
    assert f"generated: {len(got[0][1]) + len(got[1][1])} tokens".encode() in err, err


def test_ctrl_c_in_generate_mode():
    term = Terminal(model()[0], "-i", "Once upon a time", "-o", "ids", "-t", "0", "-n", "0",
                    "-e", "0", "-c", "131072")
    term.wait_for(re.compile(rb"\d+ \d+ \d+"))
    term.send(CTRL_C)
    status, output, err = term.finish()
    assert status == 0, err
    ids = strip_echo(output).split()
    assert ids and all(t.isdigit() for t in ids), output[-300:]
    assert re.search(rb"(^|\n)prompt: \d+ tokens, [0-9.]+ tok/s; generated: %d tokens"
                     % len(ids), err), err


def test_context_slides_on_a_terminal():
    users = [f"Question number {i}: what comes next?" for i in range(6)]
    term = chat("-n", "5", "-c", "64")
    for i, text in enumerate(users):
        term.wait_for(READY, i + 1)
        term.send(text.encode() + b"\r")
    term.wait_for(READY, len(users) + 1)
    term.send(CTRL_D)
    status, output, err = term.finish()
    check_restored(term, output, err, status)
    got = turns(output)
    dropped = check_dialog(got, users, 64, 5)
    assert len(dropped) >= 1 and err.count(b"dropped the") == len(dropped), err


PASTE_START, PASTE_END = b"\x1b[200~", b"\x1b[201~"
QUIET = 1.0  # seconds: run.c's EDITOR_QUIET_MS, after which an open paste or sequence ends


def test_every_editor_mode_has_a_way_out():
    """Issue 24: a paste opened and never closed swallowed every control byte (Ctrl-C and
    Ctrl-D included), and an escape sequence ate the control byte that ended it. Now a control
    byte ends a sequence and acts, Ctrl-C ends a paste (clearing the message it filled: a second
    Ctrl-C ends the session), and a paste or sequence left open goes quiet and ends. Each case:
    the session ends at the keys, status 0, the terminal restored; or the text typed after a
    quiet wait is the message."""
    ends = [PASTE_START + b"text\r" + CTRL_C * 2,          # the case
            PASTE_START + b"text\r\x1b[31" + CTRL_C * 2,   # a sequence inside the paste
            PASTE_START + b"\x1b" + CTRL_C,
            b"\x1b[12" + CTRL_C, b"\x1bO" + CTRL_C, b"\x1b" + CTRL_C,  # in a sequence
            b"\x1b[1;" + CTRL_D, b"\x1b" + CTRL_D,           # Ctrl-D on an empty message
            b"\x1b[" + b"9" * 100 + CTRL_C]                  # parameters past the buffer
    for keys in ends:
        term = chat("-n", "2")
        term.wait_for(READY)
        term.send(keys)
        status, output, err = term.finish()
        check_restored(term, output, err, status)
        assert output.count(READY) == 1 and turns(output) == [], (keys, output[-300:])
    # left open, then quiet: what is typed next is ordinary typing again (Enter sends)
    for opened, typed, want in ((PASTE_START + b"pasted\r", b" more\r", "pasted\n more"),
                                (PASTE_START, b"abc\r", "abc"),
                                (b"\x1b[1;2", b"abc\r", "abc"), (b"\x1b", b"xyz\r", "xyz")):
        term = chat("-n", "2")
        term.wait_for(READY)
        term.send(opened)
        time.sleep(QUIET + 0.5)
        term.send(typed)
        term.wait_for(READY, 2)
        term.send(CTRL_D)
        status, output, err = term.finish()
        check_restored(term, output, err, status)
        got = turns(output)
        assert len(got) == 1, (opened, output[-300:])
        assert got[0][0] == [BOS] + message("user", want) + assistant_header(), (opened, got)


def test_ctrl_d_in_a_reply_ends_the_session():
    """Issue 24: Ctrl-D typed while a reply is generated (the terminal's own mode) used to be
    lost when the editor took the terminal back. It ends the session once the reply is done
    (here stopped by Ctrl-C), after any whole line typed before it, which is sent first."""
    for ahead, n_turns in ((b"", 1), (b"typed ahead\r", 2)):
        term = chat("-n", "0", "-e", "0", "-c", "131072")
        term.wait_for(READY)
        term.send(b"Tell me everything\r")
        term.wait_for(OUT_STARTED)
        term.send(ahead + CTRL_D)
        time.sleep(0.2)  # (the terminal queues them before the interrupt)
        term.send(CTRL_C)
        if n_turns == 2:  # the line typed ahead is the next message: its reply, stopped too
            term.wait_for(OUT_STARTED, 2)
            term.send(CTRL_C)
        status, output, err = term.finish()
        check_restored(term, output, err, status)
        echo = ahead.replace(b"\r", b"\r\n")  # the terminal echoes the line amid the ids
        got = turns(strip_echo(output.replace(echo, b"") if echo else output))
        assert len(got) == n_turns and output.count(READY) == n_turns, output[-300:]
        if n_turns == 2:
            assert got[1][0] == [got[0][1][-1], EOT] + message("user", "typed ahead") + \
                assistant_header()


def test_terminal_restored_after_a_signal():
    for sig in (signal.SIGTERM, signal.SIGHUP):  # killed, or its terminal window closed
        term = chat("-n", "2")
        term.wait_for(READY)
        term.send(b"half a mess")
        term.wait_for(b"half a mess")
        attrs = termios.tcgetattr(term.fd)
        assert not attrs[3] & (termios.ICANON | termios.ECHO)  # the editor's raw mode
        os.kill(term.pid, sig)
        term.wait_for(DONE)
        attrs = termios.tcgetattr(term.fd)
        assert attrs[3] & termios.ICANON and attrs[3] & termios.ECHO  # given back
        status, output, _ = term.finish()
        assert status == -sig
        assert output.rfind(DONE) > output.rfind(READY)


BANNER = (b"chat: Enter sends, \\ at a line's end continues it, pastes keep their newlines; "
          b"/help for commands, Ctrl-D or /exit ends\n")


def test_commands_on_a_terminal():
    """Issue 25: the banner, and /help, /save, /clear and /exit typed at the prompt."""
    path = os.path.join(WORK, f"chat-{time.monotonic_ns()}.json")
    term = chat("-n", "3", "-y", "Be brief.")
    typed = [b"Hello\r", b"/help\r", b"/save " + path.encode() + b"\r", b"/clear\r", b"Hello\r"]
    for i, keys in enumerate(typed):
        term.wait_for(READY, i + 1)
        term.send(keys)
    term.wait_for(READY, len(typed) + 1)
    term.send(b"/exit\r")
    status, output, err = term.finish()
    check_restored(term, output, err, status)
    assert err.count(BANNER) == 1 and b"/clear " in err and b"//text" in err, err
    got = turns(output)
    assert len(got) == 2 and got[1] == got[0]  # after /clear: a new session's ids and reply
    assert got[0][0] == [BOS] + message("system", "Be brief.") + message("user", "Hello") + \
        assistant_header()
    saved = json.load(open(path))
    assert [(m["role"], m["content"]) for m in saved[:2]] == [("system", "Be brief."),
                                                               ("user", "Hello")]
    assert [m["role"] for m in saved] == ["system", "user", "assistant"]


def test_no_banner_when_piped():
    proc = subprocess.run([program("runomp"), model()[0], "-m", "chat", "-n", "2"],
                          input=b"Hi\n", capture_output=True, timeout=TIMEOUT)
    assert proc.returncode == 0 and b"Enter sends" not in proc.stderr


def test_ctrl_c_clears_a_half_typed_message():
    """Issue 25: Ctrl-C on a message clears it (left on the screen, marked ^C, a new prompt
    below, no history entry), and ends the session only on an empty message."""
    term = chat("-n", "2")
    term.wait_for(READY)
    term.send(b"half a message" + CTRL_C)
    term.wait_for(b"^C\r")
    term.send(b"real\r")
    term.wait_for(READY, 2)
    term.send(b"another" + LEFT * 3 + CTRL_C + UP + b"\r")  # Up: "real", not what was cleared
    term.wait_for(READY, 3)
    term.send(b"more" + CTRL_C + CTRL_C)  # the first clears, the second ends
    status, output, err = term.finish()
    check_restored(term, output, err, status)
    got = turns(output)
    assert len(got) == 2 and output.count(b"^C\r") == 3, output[-300:]
    assert got[0][0] == [BOS] + message("user", "real") + assistant_header()
    assert got[1][0] == closing(got[0][1]) + message("user", "real") + assistant_header()


def test_typing_during_a_reply_is_not_echoed_into_it():
    """Issue 25: while a reply is generated the terminal echoes nothing (and Ctrl-C still stops
    the reply); what was typed shows at the next prompt, to be finished and sent."""
    term = chat("-n", "0", "-e", "0", "-c", "131072")
    term.wait_for(READY)
    term.send(b"Tell me everything\r")
    term.wait_for(OUT_STARTED)
    modes = termios.tcgetattr(term.fd)[3]
    assert not modes & termios.ECHO and modes & termios.ISIG
    term.send(b"typed during")
    time.sleep(0.2)  # (the terminal queues it before the interrupt)
    term.send(CTRL_C)
    term.wait_for(READY, 2)
    term.wait_for(b"typed during")
    term.send(b" the reply\r")
    term.wait_for(OUT_STARTED, 2)
    term.send(CTRL_C)
    term.wait_for(READY, 3)
    term.send(CTRL_D)
    status, output, err = term.finish()
    check_restored(term, output, err, status)
    second_prompt = output.index(READY, output.index(READY) + 1)
    assert b"typed during" not in output[:second_prompt]  # not amid the reply's ids
    assert b"^C" not in output
    got = turns(output)
    assert len(got) == 2 and got[0][1], output[-300:]
    assert got[1][0] == closing(got[0][1]) + message("user", "typed during the reply") + \
        assistant_header()


def test_first_message_from_the_command_line_is_shown():
    """Issue 25: -i's message shows after the prompt, as a typed one does, and is in the
    history (Up)."""
    term = chat("-n", "2", "-i", "Hello from -i")
    term.wait_for(READY)
    term.send(UP + b"\r")
    term.wait_for(READY, 2)
    term.send(CTRL_D)
    status, output, err = term.finish()
    check_restored(term, output, err, status)
    shown = output.find(b"User: Hello from -i")
    assert 0 <= shown < output.find(b"in:"), output[:300]
    got = turns(output)
    assert len(got) == 2
    assert got[1][0] == closing(got[0][1]) + message("user", "Hello from -i") + assistant_header()
