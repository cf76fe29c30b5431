"""Checked runs: the untrusted program and the trusted checker in two processes, plain data between them.

The checker decides; these tests check that its verdict follows what it sees, that what the program
sends cannot be more than plain data, and that the program cannot reach the checker's code, memory,
evidence or process.
"""

from __future__ import annotations

import os
import textwrap

from loopcoder.evaluation import channel
from loopcoder.evaluation.sandbox import Checked, Limits, isolation_report, run_many, run_program

QUICK = Limits(cpu_seconds=5, wall_seconds=20)
AS_ROOT = os.geteuid() == 0


def checked(program: str, checker: str, limits: Limits = QUICK):
    job = Checked(
        program=channel.program_side("test (the program)") + textwrap.dedent(program),
        checker=channel.checker_side("test (the checker)") + textwrap.dedent(checker),
    )
    return run_program(job, limits, allow_code_execution=True)


def test_the_checker_decides_from_the_programs_plain_answers():
    program = """
        def double(x):
            return x * 2
        _serve({"double": double, "pair": lambda: (1, [2.5, float("inf")], {"k": {3}}, None, 1j, "é")})
    """
    passing = checked(program, 'assert _remote("double")(21) == 42\n')
    assert passing.passed, passing
    assert checked(program, 'assert _remote("pair")() == (1, [2.5, float("inf")], {"k": {3}}, None, 1j, "é")\n').passed
    failing = checked(program, 'assert _remote("double")(2) == 5, "wrong"\n')
    assert failing.status == "failed" and "AssertionError: wrong" in failing.stderr
    assert "checker" in failing.stderr  # the traceback is the checker's


def test_what_is_not_plain_data_never_reaches_the_checker():
    program = """
        class AlwaysEqual:
            def __eq__(self, other):
                return True
        _serve({"odd": lambda: AlwaysEqual(), "generator": lambda: (i for i in range(3)), "raises": lambda: 1 / 0})
    """
    checker = """
        outcomes = []
        for name in ("odd", "generator", "raises"):
            try:
                _remote(name)()
                outcomes.append("answered")
            except ProgramError as e:
                outcomes.append(str(e))
        print(outcomes)
    """
    result = checked(program, checker)
    assert result.passed, result
    outcomes = eval(result.stdout)
    assert outcomes[0] == "the program raised TypeError: not plain data: AlwaysEqual"
    assert outcomes[1] == "the program raised TypeError: not plain data: generator"
    assert outcomes[2] == "the program raised ZeroDivisionError: division by zero"


def test_garbage_on_the_channel_is_a_program_error():
    program = """
        import os
        for line in _requests:
            _replies.write(b'{"value": {"__set__": [[1]]}}\\n' if b"set" in line else b'not json\\n')
            _replies.flush()
    """
    checker = """
        for name in ("set", "garbage"):
            try:
                _remote(name)()
            except ProgramError as e:
                print(e)
    """
    result = checked(program, checker)
    assert result.passed, result
    assert [line.split(" (")[0] for line in result.stdout.splitlines()] == [
        "the program's answer is not plain data",
        "the program's answer is not plain data",
    ]


def test_a_program_that_ends_or_is_killed_before_answering():
    ended = checked("import os\nos._exit(0)\n", '_remote("anything")()\n')
    assert ended.status == "failed" and "the program ended before answering" in ended.reason
    spin = "def spin():\n    while True:\n        pass\n\n\n_serve({'spin': spin})\n"
    spinning = checked(spin, '_remote("spin")()\n', Limits(cpu_seconds=1))
    assert spinning.status == "killed" and spinning.signal in ("SIGXCPU", "SIGKILL"), spinning
    assert "the program was killed" in spinning.reason


SECRET = "expected-" + os.urandom(8).hex()


def test_the_program_cannot_find_the_checkers_code_or_values():
    # The checker holds a secret (as a test holds its expected values); the program looks everywhere it
    # can: its own memory, files, every process's command line, environment, memory and descriptors.
    program = f"""
        import gc, os
        needle = "{SECRET[:9]}" + "{SECRET[9:]}"  # never whole in this source
        found = []
        for obj in gc.get_objects():
            if isinstance(obj, (str, bytes)) and needle.encode() in (obj if isinstance(obj, bytes) else obj.encode()):
                found.append("own memory")
        for top in ("/tmp", os.getcwd()):
            for parent, _, names in os.walk(top):
                for name in names:
                    try:
                        if needle.encode() in open(os.path.join(parent, name), "rb").read():
                            found.append(os.path.join(parent, name))
                    except OSError:
                        pass
        for pid in [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]:
            for part in ("cmdline", "environ", "mem", "fd/3", "fd/4", "fd/5", "fd/6"):
                try:
                    with open(f"/proc/{{pid}}/{{part}}", "rb") as f:
                        data = f.read(1 << 20)
                    found.append(f"/proc/{{pid}}/{{part}}") if needle.encode() in data else None
                except OSError:
                    pass
        _serve({{"found": lambda: found, "uid": os.getuid}})
    """
    checker = f"""
        import os
        secret = "{SECRET}"
        assert _remote("found")() == [], _remote("found")()
        print(_remote("uid")(), os.getuid())
    """
    result = checked(program, checker)
    assert result.passed, result
    program_uid, checker_uid = (int(x) for x in result.stdout.split())
    if AS_ROOT:  # two fresh uids: the program cannot even signal the checker
        assert program_uid != checker_uid and min(program_uid, checker_uid) > 65535


def test_checked_runs_in_a_batch_keep_their_order():
    jobs = [
        Checked(
            channel.program_side("p") + f"_serve({{'n': lambda: {i}}})\n",
            channel.checker_side("c") + f"assert _remote('n')() == {i} and {i} % 2 == 0\n",
        )
        for i in range(6)
    ]
    batch = run_many(jobs, QUICK, workers=2, allow_code_execution=True)
    assert [r.passed for r in batch.results] == [i % 2 == 0 for i in range(6)]
    assert isolation_report()["pid namespace"]  # the same sandbox as programs
