"""
Tests of evaluate.py's code sandbox: honest programs work, broken ones fail with their reason, and a
table of hostile programs, each of which passes only if its attack worked, is held: under bubblewrap
every one, with the host and the evaluator checked untouched (decoy files, loopback listeners that
must hear nothing, bystander processes that must live, no process left behind); without bubblewrap
the test prints which are held and asserts those the README promises.
"""
import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import evaluate as ev

needs_bwrap = pytest.mark.skipif(ev.bwrap_command() is None, reason="bubblewrap (bwrap) cannot run here")


# ---------------------------------------------------------------------------
# broken and honest programs

SANDBOX_CASES = [
    ("correct", "def f(x):\n    return x + 1\nassert f(1) == 2\nprint('ok')", "passed"),
    ("wrong answer", "assert 1 + 1 == 3", "error: AssertionError"),
    ("exception", "raise KeyError('boom')", "error: KeyError"),
    ("10 GB allocation", "x = bytearray(10 * 1024**3)", "memory"),
    ("growing list", "a = []\nwhile True:\n    a.append(' ' * 10**6)", "memory"),
    ("os.system", "import os\nos.system('echo pwned')", "blocked: os.system"),
    ("subprocess", "import subprocess\nsubprocess.run(['ls', '/'])", "blocked: subprocess.run"),
    ("fork", "import os\nwhile True:\n    os.fork()", "blocked: os.fork"),
    ("delete outside", "import os\nos.remove('/etc/hostname')", "blocked: os.remove outside the temp dir"),
    ("delete outside by keyword", "import os\nos.remove(path='/etc/hostname')", "blocked: os.remove outside"),
    ("rmtree outside", "import shutil\nshutil.rmtree('/usr')", "blocked: shutil.rmtree outside the temp dir"),
    ("socket", "import socket\nsocket.create_connection(('127.0.0.1', 80))", "blocked: import socket"),
    ("swallowed violation", "import os\ntry:\n    os.system('x')\nexcept Exception:\n    pass", "blocked: os.system"),
    ("write outside", "open('/var/tmp/slimchat-pwned.txt', 'w').write('x')", "blocked: writing outside the temp dir"),
    ("sys.exit(0) before the tests", "import sys\nsys.exit(0)\nassert False", "exited: SystemExit(0)"),
    ("os._exit(0) before the tests", "import os\nos._exit(0)\nassert False", "exited: status 0"),
    ("syntax error", "def f(:\n    pass", "error: SyntaxError"),
]


@pytest.mark.parametrize("isolated", [True, False], ids=["bwrap", "fallback"])
@pytest.mark.parametrize("name,code,reason", SANDBOX_CASES, ids=[c[0] for c in SANDBOX_CASES])
def test_sandbox(name, code, reason, isolated):
    """Every broken or plainly hostile program fails fast with its reason, with or without bwrap;
    only the correct one passes. An exit before the tests is a failure, whatever its status."""
    if isolated and ev.bwrap_command() is None:
        pytest.skip("bubblewrap (bwrap) cannot run here")
    t0 = time.time()
    result = ev.run_sandboxed(code, timeout=3.0, isolated=isolated)
    assert result.reason.startswith(reason), (result.reason, result.stderr)
    assert result.passed == (reason == "passed") and result.isolated == isolated
    assert time.time() - t0 < 2.5
    assert not os.path.exists("/var/tmp/slimchat-pwned.txt")


def test_without_bwrap_one_warning_and_evaluation_goes_on():
    """Where bubblewrap is missing, programs still run (unisolated) and the user is told once why
    and how to fix it."""
    code = ("import evaluate as ev\nrs = [ev.run_sandboxed('import random') for _ in range(2)]\n"
            "print([(r.reason, r.isolated) for r in rs])")
    env = dict(os.environ, PATH="/nonexistent")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.abspath(ev.__file__)))
    assert run.stdout.strip() == "[('passed', False), ('passed', False)]", run.stderr
    assert run.stderr.count("WITHOUT OS isolation (bwrap is not installed)") == 1
    assert "apt-get install bubblewrap" in run.stderr


def test_sandbox_kills_infinite_loop_on_time():
    t0 = time.time()
    result = ev.run_sandboxed("while True:\n    pass", timeout=1.0)
    assert (result.passed, result.reason) == (False, "timeout after 1s")
    assert time.time() - t0 < 2.0


HONEST = {   # module: a line that uses it the way solutions and HumanEval's tests do
    "random": "random.seed(1); assert random.randint(1, 6) in range(1, 7) and len(random.sample(range(9), 3)) == 3",
    "math": "assert math.isclose(math.sqrt(2) ** 2, 2) and math.gcd(12, 18) == 6",
    "itertools": "assert list(itertools.permutations('ab')) == [('a', 'b'), ('b', 'a')]",
    "functools": "assert functools.reduce(lambda a, b: a * b, [1, 2, 3, 4]) == 24",
    "collections": "assert collections.Counter('abca').most_common(1) == [('a', 2)]",
    "heapq": "h = [5, 1, 3]; heapq.heapify(h); assert heapq.heappop(h) == 1",
    "bisect": "assert bisect.bisect_left([1, 3, 5], 4) == 2",
    "re": "assert re.findall(r'\\d+', 'a12b3') == ['12', '3']",
    "string": "assert string.ascii_lowercase[:3] == 'abc'",
    "hashlib": "assert hashlib.md5(b'').hexdigest() == 'd41d8cd98f00b204e9800998ecf8427e'",
    "statistics": "assert statistics.median([3, 1, 2]) == 2 and statistics.stdev([1, 1, 1]) == 0",
    "fractions": "assert fractions.Fraction(1, 3) + fractions.Fraction(1, 6) == fractions.Fraction(1, 2)",
    "decimal": "assert decimal.Decimal('0.1') + decimal.Decimal('0.2') == decimal.Decimal('0.3')",
    "datetime": "assert (datetime.date(2024, 3, 1) - datetime.date(2024, 2, 1)).days == 29",
    "typing": "def f(x: typing.List[int]) -> typing.Optional[int]:\n    return None\nassert f([1]) is None",
    "copy": "a = [[1]]; b = copy.deepcopy(a); b[0].append(2); assert a == [[1]]",
    "tempfile": ("with tempfile.TemporaryDirectory() as d:\n    open(d + '/x', 'w').write('y')\n"
                 "with tempfile.NamedTemporaryFile('w+') as t:\n    t.write('z'); t.seek(0); assert t.read() == 'z'"),
    "json": "assert json.loads(json.dumps({'a': [1, 2.5, None]})) == {'a': [1, 2.5, None]}",
}


@pytest.mark.parametrize("mode", ["humaneval", "whole"])
@pytest.mark.parametrize("isolated", [True, False], ids=["bwrap", "fallback"])
def test_honest_programs_pass(isolated, mode):
    """The modules solutions and tests commonly use import and behave (random used to fail: the
    guards refused os.register_at_fork, which it calls); the scratch dir is writable and the
    environment holds nothing of the evaluator's. As HumanEval runs it, the program is a solution."""
    if isolated and ev.bwrap_command() is None:
        pytest.skip("bubblewrap (bwrap) cannot run here")
    programs = {m: f"import {m}\n{line}\n" for m, line in HONEST.items()}
    programs["scratch and env"] = (
        "import os, shutil\nopen('a.txt', 'w').write('x')\nos.remove('a.txt')\n"
        "os.makedirs('d/e')\nopen('d/e/f', 'w').write('x')\nshutil.rmtree('d')\n"
        "assert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LC_CTYPE', 'PWD'}, os.environ")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = dict(zip(programs, pool.map(lambda job: run_program(*job, isolated, mode, timeout=ev.SANDBOX_TIMEOUT),
                                              programs.items())))
    assert {m: r.reason for m, r in results.items() if not r.passed} == {}


# ---------------------------------------------------------------------------
# as HumanEval runs a solution: the harness runs the prompt (for its helpers), the tests and check();
# the entry point is a proxy to the solution's own process, and values cross as plain data

PROMPT = ('import math\n\ndef poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\n'
          'def f(xs):\n    """The entry point."""\n')
NESTED = "[(1, 2), {'a': {1, 2}, 3: None}, frozenset([3]), b'x', 1 + 2j, True, -0.0, [[]], 'é']"
HUMANEVAL_CASES = [
    ("correct", "def f(xs):\n    return sum(xs)\n", "assert candidate([1, 2]) == 3", "passed"),
    ("helper from the prompt", "def f(xs):\n    return poly(xs, 2)\n",
     "assert candidate([1, 1]) == 3 == poly([1, 1], 2)", "passed"),
    ("floats with tolerance", "def f(xs):\n    return [sum(xs) / 3, float('nan'), -float('inf')]\n",
     "a, b, c = candidate([1.0, 0.0])\n    assert abs(a - 1 / 3) < 1e-9 and math.isnan(b) and c == -math.inf", "passed"),
    ("nested containers", f"def f(xs):\n    return {NESTED}\n",
     f"r = candidate([])\n    assert r == {NESTED} and type(r[0]) is tuple and r[5] is True\n"
     "    assert math.copysign(1, r[6]) == -1", "passed"),
    ("expected exception", "def f(xs):\n    if not xs:\n        raise ValueError('empty')\n    return xs\n",
     "try:\n        candidate([])\n    except ValueError as e:\n        assert str(e) == 'empty'\n"
     "    else:\n        assert False\n    assert candidate([{1: (2,)}]) == [{1: (2,)}]", "passed"),
    ("wrong answer", "def f(xs):\n    return 0\n", "assert candidate([1, 2]) == 3", "error: AssertionError"),
    ("unexpected exception", "def f(xs):\n    return {}[1]\n", "candidate([])", "error: KeyError"),
    ("not a builtin exception", "class Oops(Exception):\n    pass\ndef f(xs):\n    raise Oops('x')\n",
     "candidate([])", "error: Exception: Oops: x"),
    ("a generator back", "def f(xs):\n    return (x for x in xs)\n",
     "try:\n        list(candidate([1]))\n    except BaseException:\n        pass",
     "error: the result: a generator cannot cross"),
    ("a function as argument", "def f(xs):\n    return xs\n", "candidate(len)", "error: Unsendable: a builtin"),
    ("SystemExit at import", "raise SystemExit(0)\n", "pass", "exited: SystemExit(0) before the tests returned"),
    ("os._exit at import", "import os\nos._exit(0)\n", "pass", "exited: status 0 before the tests returned"),
    ("os._exit in a call", "import os\ndef f(xs):\n    os._exit(0)\n", "candidate([])", "exited: status 0"),
    ("a caught os._exit in a call", "import os\ndef f(xs):\n    os._exit(0)\n",
     "try:\n        candidate([])\n    except BaseException:\n        pass", "exited: status 0"),
    ("blocked in a call", "import os\ndef f(xs):\n    os.system('true')\n", "candidate([])", "blocked: os.system"),
    ("memory in a call", "def f(xs):\n    return bytearray(2**30)\n", "candidate([])", "memory"),
    ("syntax error", "def f(:\n", "candidate([])", "error: SyntaxError"),
]


@pytest.mark.parametrize("isolated", [True, False], ids=["bwrap", "fallback"])
def test_humaneval_split(isolated):
    """Values, helpers and exceptions cross between the tests and the solution as a test expects; a
    failure on the solution's side (an exit, a refused call, a value that cannot cross) says why."""
    if isolated and ev.bwrap_command() is None:
        pytest.skip("bubblewrap (bwrap) cannot run here")
    def run(case):
        _, solution, test, _ = case
        judge = {"prompt": PROMPT, "test": f"def check(candidate):\n    {test}\n", "entry_point": "f"}
        return ev.run_sandboxed(PROMPT + solution, timeout=3.0, isolated=isolated, judge=judge)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, HUMANEVAL_CASES))
    wrong = {name: (r.reason, r.stderr[-300:]) for (name, _, _, reason), r in zip(HUMANEVAL_CASES, results)
             if not r.reason.startswith(reason) or r.passed != (reason == "passed") or r.isolated != isolated}
    assert wrong == {}


# ---------------------------------------------------------------------------
# hostile programs. Placeholders: {HOST} a host dir with decoys {NAME}.txt and {NAME}.dir, {PORT} /
# {UDP} / {UNIX} / {ABSTRACT} listeners, {VICTIM} a bystander process (its environment holds
# {CANARY}), {MARK} the argument of a `sleep` that must not outlive the run, {REPO} evaluate.py.

UNDO = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ImportBlocker"]
for _m in [m for m in sys.modules if m.split(".")[0] in ("os", "posix", "subprocess", "_posixsubprocess", "shutil")]:
    del sys.modules[_m]
import _io, builtins, io, os, posix, shutil, signal, subprocess
builtins.open = io.open = _io.open
"""
SEND_TCP = "s = socket.create_connection(('127.0.0.1', {PORT}), timeout=2)\ns.sendall(b'{NAME}')\ns.close()\n"
TOUCH = "{HOST}/{NAME}-new"
FAKE_END = "\nassert False, 'the tests ran and failed'\n"

# (name, program, without bwrap: "held" = promised by the README and asserted, "" = recorded only,
#  "skip" = not run without bwrap, because escaping would harm the machine running the tests)
HOSTILE = [
    ("net-socket", "import socket\n" + SEND_TCP, "held"),
    ("net-socket-undone", UNDO + "import socket\n" + SEND_TCP, ""),
    ("net-socket-from-its-file", """import importlib.machinery, importlib.util
spec = importlib.machinery.PathFinder.find_spec("_socket") or importlib.machinery.BuiltinImporter.find_spec("_socket")
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
s = m.socket(2, 1)
s.settimeout(2)
s.connect(("127.0.0.1", {PORT}))
s.send(b"{NAME}")
""", ""),
    ("net-ctypes-connect", UNDO + """import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(2, 1, 0)
addr = struct.pack("=H", 2) + struct.pack("!H", {PORT}) + bytes([127, 0, 0, 1]) + bytes(8)
assert libc.connect(fd, addr, len(addr)) == 0, ctypes.get_errno()
assert libc.send(fd, b"{NAME}", len(b"{NAME}"), 0) > 0
""", ""),
    ("net-child-python", UNDO + "subprocess.run([sys.executable, '-c', \"import socket\\n" +
     SEND_TCP.replace("\n", "\\n") + "\"], check=True)\n", ""),
    ("net-unix-socket", UNDO + "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('{UNIX}')\n"
     "s.sendall(b'{NAME}')\n", ""),
    ("net-abstract-socket", UNDO + "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0{ABSTRACT}')\n"
     "s.sendall(b'{NAME}')\n", ""),
    ("net-udp", UNDO + "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.settimeout(1)\n"
     "s.sendto(b'{NAME}', ('127.0.0.1', {UDP}))\nassert s.recv(10) == b'ack'\n", ""),
    ("write-open", "open('{HOST}/{NAME}.txt', 'w').write('pwned')\n", "held"),
    ("write-fileio", "import io\nio.FileIO('{HOST}/{NAME}.txt', 'w').write(b'pwned')\n", ""),
    ("write-guards-real-open", """real = [c.cell_contents for c in open.__closure__
        if getattr(c.cell_contents, "__name__", "") == "open" and c.cell_contents is not open][0]
real("{HOST}/{NAME}.txt", "w").write("pwned")
""", ""),
    ("write-os-open-undone", UNDO + "fd = os.open('" + TOUCH + "', os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')\n", ""),
    ("rename-into-host", "import os\nopen('x', 'w').write('x')\nos.rename('x', '" + TOUCH + "')\n", "held"),
    ("rename-host-file-undone", UNDO + "os.rename('{HOST}/{NAME}.txt', '{HOST}/{NAME}-moved')\n", ""),
    ("link-into-host", "import os\nopen('x', 'w').write('x')\nos.link('x', '" + TOUCH + "')\n", "held"),
    ("symlink-into-host", "import os\nos.symlink('x', '" + TOUCH + "')\n", "held"),
    ("link-host-file-in-undone", UNDO + "os.link('{HOST}/{NAME}.txt', 'h')\nopen('h', 'w').write('pwned')\n", ""),
    ("delete", "import os\nos.remove('{HOST}/{NAME}.txt')\n", "held"),
    ("delete-undone", UNDO + "os.remove('{HOST}/{NAME}.txt')\n", ""),
    ("rmtree-undone", UNDO + "shutil.rmtree('{HOST}/{NAME}.dir')\n", ""),
    ("chmod-undone", UNDO + "os.chmod('{HOST}/{NAME}.txt', 0o777)\n", ""),
    ("utime", "import os\nos.utime('{HOST}/{NAME}.txt', (0, 0))\n", ""),
    ("mkfifo", "import os\nos.mkfifo('" + TOUCH + "')\n", ""),
    ("read-host-file", "assert open('{HOST}/{NAME}.txt').read() == 'secret-{NAME}'\n", ""),
    ("read-evaluator-source", "assert 'SANDBOX_PRELUDE' in open('{REPO}').read()\n", ""),
    ("read-parent-environ", "import os\nassert open(f'/proc/{os.getppid()}/environ', 'rb').read()\n", ""),
    ("read-environ-canary", """import os
found = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        found.append(b"{CANARY}" in open(f"/proc/{pid}/environ", "rb").read())
    except OSError:
        pass
assert any(found)
""", ""),
    ("read-parent-cwd", "import os\nassert 'evaluate.py' in os.listdir(f'/proc/{os.getppid()}/cwd')\n", ""),
    ("read-shadow", "assert ':' in open('/etc/shadow').read()\n", ""),
    ("spawn-system", "import os\nassert os.system('touch " + TOUCH + "') == 0\n", "held"),
    ("spawn-system-undone", UNDO + "assert os.system('touch " + TOUCH + "') == 0\n", ""),
    ("spawn-subprocess-undone", UNDO + "subprocess.run(['touch', '" + TOUCH + "'], check=True)\n", ""),
    ("spawn-posix-spawn-undone", UNDO + "pid = os.posix_spawn('/usr/bin/touch', ['touch', '" + TOUCH +
     "'], {})\nassert os.waitpid(pid, 0)[1] == 0\n", ""),
    ("spawn-fork-exec-undone", UNDO + "pid = os.fork()\nif pid == 0:\n    os.execv('/usr/bin/touch', "
     "['touch', '" + TOUCH + "'])\nassert os.waitpid(pid, 0)[1] == 0\n", ""),
    ("spawn-ctypes-system", UNDO + "import ctypes\nassert ctypes.CDLL(None).system(b'touch " + TOUCH + "') == 0\n", ""),
    ("spawn-multiprocessing-undone", UNDO + "import multiprocessing\np = multiprocessing.Process(target=os.mkdir, "
     "args=('" + TOUCH + "',))\np.start()\np.join()\nassert p.exitcode == 0\n", ""),
    ("fork-300-children-undone", UNDO + "for i in range(300):\n    if os.fork() == 0:\n"
     "        os.execv('/usr/bin/sleep', ['sleep', '{MARK}'])\n", ""),
    ("threads-200", "import threading, time\nfor i in range(200):\n    threading.Thread(target=time.sleep, "
     "args=(5,), daemon=True).start()\n", ""),
    ("survive-setsid-undone", UNDO + "if os.fork() == 0:\n    os.setsid()\n"
     "    os.execv('/usr/bin/sleep', ['sleep', '{MARK}'])\n", ""),
    ("survive-new-session-undone", UNDO + "subprocess.Popen(['sleep', '{MARK}'], start_new_session=True)\n", ""),
    ("kill-parent-undone", UNDO + "os.kill(os.getppid(), signal.SIGKILL)\n", "skip"),
    ("kill-everything-undone", UNDO + "os.kill(-1, signal.SIGKILL)\n", "skip"),
    ("kill-host-process", "import os\nos.kill({VICTIM}, 9)\n", "held"),
    ("kill-host-process-undone", UNDO + "os.kill({VICTIM}, signal.SIGKILL)\n", ""),
    ("stop-host-process-undone", UNDO + "os.kill({VICTIM}, signal.SIGSTOP)\n", ""),
    ("memory-10GB", "x = bytearray(10 * 2**30)\n", "held"),
    ("memory-raise-limit-undone", UNDO + "import resource\nresource.setrlimit(resource.RLIMIT_AS, "
     "(resource.RLIM_INFINITY, resource.RLIM_INFINITY))\nx = bytearray(2**30)\n", ""),
    ("memory-mmap-4GB", "import mmap\nm = mmap.mmap(-1, 4 * 2**30)\n", "held"),
    ("cpu-busy-loop", "while True:\n    pass\n", "held"),
    ("cpu-ignore-sigxcpu-undone", UNDO + "signal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n",
     "held"),
    ("output-flood-stdout", "while True:\n    print('x' * 65536)\n", "held"),
    ("output-flood-stderr", "import sys\nwhile True:\n    sys.stderr.write('x' * 65536)\n", "held"),
    ("disk-fill", "for i in range(13):\n    open(f'big{i}', 'wb').write(b'x' * 16_000_000)\n", ""),
    ("fake-sys-exit-0", "import sys\nsys.exit(0)" + FAKE_END, "held"),
    ("fake-raise-systemexit", "raise SystemExit" + FAKE_END, "held"),
    ("fake-os-exit-0", "import os\nos._exit(0)" + FAKE_END, "held"),
    ("fake-sigkill-self-undone", UNDO + "os.kill(os.getpid(), signal.SIGKILL)" + FAKE_END, "held"),
    ("fake-sigterm-self", "import signal\nsignal.raise_signal(signal.SIGTERM)" + FAKE_END, "held"),
    ("fake-keyboard-interrupt", "raise KeyboardInterrupt" + FAKE_END, "held"),
    ("fake-pass-markers", """import os, sys
print("passed")
print("SANDBOX-RESULT passed: ", file=sys.stderr)
for fd in range(3, 64):
    try:
        os.write(fd, b"passed: ")
    except OSError:
        pass
os._exit(0)""" + FAKE_END, "held"),
    ("fake-replace-harness", """import __main__, os, sys
for name, value in list(vars(__main__).items()):
    if callable(value):
        setattr(__main__, name, lambda *args, **kwargs: None)
os._exit = lambda status=0: None
os.write = lambda fd, data: len(data)
sys.exit(0)""" + FAKE_END, "held"),
    ("fake-atexit", "import atexit, sys\natexit.register(print, 'passed')\nsys.exit(0)" + FAKE_END, "held"),
    ("fake-close-every-fd", """import os, sys
for fd in range(3, 256):
    try:
        os.close(fd)
    except OSError:
        pass
sys.exit(0)""" + FAKE_END, "held"),
    # HumanEval's tests fail on every forge- row (TESTS_FAIL), so a pass there is forged. The first two
    # forge a whole program's pass (test_a_whole_program_can_forge_its_pass); a split one they cannot.
    ("forge-secret-search", """import gc, os, re, sys
strings, frame = [], sys._getframe()
while frame:   # the harness's frames, then everything the collector tracks
    strings += [v for v in frame.f_locals.values() if isinstance(v, str)]
    frame = frame.f_back
for o in gc.get_objects():
    strings += [v for v in (o.values() if isinstance(o, dict) else o if isinstance(o, (list, tuple)) else ())
                if isinstance(v, str)]
for secret in {s for s in strings if re.fullmatch("[0-9a-f]{32}", s)}:
    for fd in range(256):
        try:
            os.write(fd, f"{secret} passed: ".encode())
        except OSError:
            pass
os._exit(0)
""", "held"),
    ("forge-call-report", """import gc
for o in gc.get_objects():
    if callable(o) and getattr(o, "__name__", "") in ("report", "check", "trusted", "proxy"):
        try:
            o("passed")
        except BaseException:
            pass
""" + FAKE_END, "held"),
    ("forge-replace-check", """import builtins, gc
nothing = (lambda *args, **kwargs: None).__code__
for o in gc.get_objects():
    if type(o).__name__ == "function" and o.__name__ in ("check", "proxy", "receive", "trusted", "decode"):
        try:
            o.__code__ = nothing
        except ValueError:   # closures need a code with the same free variables
            pass
builtins.AssertionError = type("AssertionError", (Exception,), {})

def f(x):
    return x
""", "held"),
    ("forge-patch-proxy", """import os, sys

def f(x):   # called from the tests: rewrite whatever is up the stack, then answer with forged replies
    frame = sys._getframe()
    while frame:
        for name in ("proxy", "check", "report", "receive", "trusted", "exception", "decode", "send"):
            if name in frame.f_globals:
                frame.f_globals[name] = lambda *args, **kwargs: None
        for value in list(frame.f_locals.values()):
            try:
                value.write(b'["fail", "passed", ""]\\n["return", true]\\n')
                value.flush()
            except BaseException:
                pass
        frame = frame.f_back
    for fd in range(3, 64):
        try:
            os.write(fd, b'passed: \\n["fail", "passed", ""]\\n')
        except OSError:
            pass
    return x
""", "held"),
    ("ptrace-harness-memory", """import os
ppid = os.getppid()   # the HumanEval harness: its memory (and fds) would let a program write the report
open(f"/proc/{ppid}/mem", "rb").close()
os.listdir(f"/proc/{ppid}/fd")
""", ""),
]


def fill(code, **values):
    for key, value in values.items():
        code = code.replace("{" + key + "}", str(value))
    return code


class Listeners:
    """TCP, UDP, Unix and abstract-Unix listeners on loopback; `heard` collects what reached them."""
    def __init__(self, unix_path):
        self.heard, self.abstract = [], f"slimchat-sandbox-test-{os.getpid()}-{time.time_ns()}"
        self.tcp, self.udp = socket.create_server(("127.0.0.1", 0)), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.unix, self.abstract_sock = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
        self.unix.bind(unix_path)
        self.abstract_sock.bind("\0" + self.abstract)
        for s in (self.tcp, self.unix, self.abstract_sock):
            s.listen(64)
            threading.Thread(target=self.accept, args=(s,), daemon=True).start()
        threading.Thread(target=self.receive, daemon=True).start()

    def receive(self):
        while True:   # answers, so a sender can tell that it got through
            data, sender = self.udp.recvfrom(100)
            self.heard.append(data)
            self.udp.sendto(b"ack", sender)

    def accept(self, server):
        while True:
            conn, _ = server.accept()
            conn.settimeout(2)
            try:
                self.heard.append(conn.recv(100) or b"(connected)")
            except OSError:
                self.heard.append(b"(connected)")

    def ports(self):
        return {"PORT": self.tcp.getsockname()[1], "UDP": self.udp.getsockname()[1], "ABSTRACT": self.abstract}


def fingerprint(path):
    """What a write, chmod, link or touch changes (not the access time a read changes)."""
    st = os.stat(path)
    return open(path).read(), st.st_mode, st.st_nlink, st.st_size, st.st_mtime_ns


def processes_with(text):
    """pids whose command line contains text."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                found.append(int(pid))
        except OSError:
            pass
    return found


HOSTILE_PROMPT = 'def f(x):\n    """The task\'s stand-in; a hostile program may define its own f."""\n'
RAN_TO_ITS_END = "def check(candidate):\n    pass\n"   # a pass: the program ran to its end, so its attack worked
TESTS_FAIL = "def check(candidate):\n    candidate(1)\n    assert False, 'the tests ran and failed'\n"


def run_program(name, code, isolated, mode, timeout=2.0):
    """As HumanEval runs it (the program is the solution, the harness runs the tests) or whole."""
    if mode == "whole":
        return ev.run_sandboxed(code, timeout=timeout, isolated=isolated)
    judge = {"prompt": HOSTILE_PROMPT, "test": TESTS_FAIL if name.startswith("forge-") else RAN_TO_ITS_END,
             "entry_point": "f"}
    return ev.run_sandboxed(HOSTILE_PROMPT + code, timeout=timeout, isolated=isolated, judge=judge)


def run_hostile(tmp_path, isolated, rows, mode="humaneval"):
    """Run rows in parallel against fresh decoys; {name: (passed, reason, what on the host changed)}."""
    host = tmp_path / "host"
    host.mkdir()
    listeners = Listeners(str(host / "listen.sock"))
    canary = f"canary-{os.getpid()}-{time.time_ns()}"
    jobs, victims, marks, stats = {}, {}, {}, {}
    for i, (name, code, _) in enumerate(rows):
        (host / f"{name}.txt").write_text(f"secret-{name}")
        (host / f"{name}.dir").mkdir()
        (host / f"{name}.dir" / "keep.txt").write_text("keep")
        stats[name] = fingerprint(host / f"{name}.txt")
        victims[name] = subprocess.Popen(["sleep", "120"], env={"CANARY": canary}, start_new_session=True)
        marks[name] = f"{700 + i}.{os.getpid()}"
        jobs[name] = fill(code, HOST=host, NAME=name, UNIX=host / "listen.sock", VICTIM=victims[name].pid,
                          CANARY=canary, MARK=marks[name], REPO=os.path.abspath(ev.__file__), **listeners.ports())
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = dict(zip(jobs, pool.map(lambda job: run_program(*job, isolated, mode), jobs.items())))
    time.sleep(0.5)   # let anything that escaped act
    outcome = {}
    for name, result in results.items():
        changed = [f"{p} appeared" for p in (f"{name}-new", f"{name}-moved") if os.path.lexists(host / p)]
        path = host / f"{name}.txt"
        if not path.exists() or fingerprint(path) != stats[name]:
            changed.append(f"{name}.txt changed")
        if not (host / f"{name}.dir" / "keep.txt").exists():
            changed.append(f"{name}.dir deleted")
        if name.encode() in listeners.heard:
            changed.append("a listener heard it")
        if victims[name].poll() is not None or open(f"/proc/{victims[name].pid}/stat").read().split()[2] == "T":
            changed.append("the bystander process was killed or stopped")
        for pid in processes_with(marks[name]):
            changed.append(f"process {pid} outlived the run")
            os.kill(pid, signal.SIGKILL)
        outcome[name] = (result.passed, result.reason, changed)
    for victim in victims.values():
        victim.kill()
        victim.wait()
    unknown = [h for h in listeners.heard if h.decode("utf-8", "replace") not in outcome]
    if unknown:
        outcome["(listeners)"] = (False, "", [f"heard {unknown}"])
    return outcome


def table(outcome):
    return "\n".join(f"{'HELD' if not p and not c else 'ESCAPED':8} {n:30} {r[:60]:60} {'; '.join(c)}"
                     for n, (p, r, c) in outcome.items())


def test_hostile_table_is_large():
    assert len(HOSTILE) >= 40 and len({name for name, _, _ in HOSTILE}) == len(HOSTILE)


WHOLE_ROWS = [row for row in HOSTILE if not row[0].startswith("forge-")]   # a whole program can forge


@needs_bwrap
@pytest.mark.parametrize("mode", ["humaneval", "whole"])
def test_bwrap_holds_every_hostile_program(tmp_path, mode):
    """Under bubblewrap no attack works, even after the in-process guards are undone: no pass, and
    the host is untouched. The evaluator lives on (this test is it). As HumanEval runs them, no
    forge works either: the tests run in a process the program cannot reach."""
    outcome = run_hostile(tmp_path, True, HOSTILE if mode == "humaneval" else WHOLE_ROWS, mode)
    print("\n" + table(outcome))
    escaped = {n: (r, c) for n, (p, r, c) in outcome.items() if p or c}
    assert escaped == {}


@pytest.mark.parametrize("mode", ["humaneval", "whole"])
def test_fallback_holds_what_the_readme_promises(tmp_path, mode):
    """Without bubblewrap, the in-process layer, the rlimits and the harness's report still hold the
    plain attacks, resource exhaustion, every fake pass and, as HumanEval runs them, every forge
    (asserted); the rest is printed (the README's table records what escapes on a test machine)."""
    rows = [row for row in (HOSTILE if mode == "humaneval" else WHOLE_ROWS) if row[2] != "skip"]
    outcome = run_hostile(tmp_path, False, rows, mode)
    print("\n" + table(outcome))
    promised = {name for name, _, fallback in rows if fallback == "held"}
    assert {n: (r, c) for n, (p, r, c) in outcome.items() if n in promised and (p or c)} == {}


@pytest.mark.parametrize("isolated", [True, False], ids=["bwrap", "fallback"])
def test_a_whole_program_can_forge_its_pass(isolated):
    """The limit of the whole-program mode, and proof the forge rows are live attacks: in one
    interpreter with the harness, searching it for the secret or calling its report forges a pass."""
    if isolated and ev.bwrap_command() is None:
        pytest.skip("bubblewrap (bwrap) cannot run here")
    rows = dict((name, code) for name, code, _ in HOSTILE)
    for name in ("forge-secret-search", "forge-call-report"):
        assert ev.run_sandboxed(rows[name], timeout=2.0, isolated=isolated).passed, name
