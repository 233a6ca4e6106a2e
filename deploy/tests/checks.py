"""The bookkeeping the deploy/tests/test_*.py scripts share: `check` and `eq` record one
named result; `guarded` runs one group of checks so that a group that raises is a failure
of that group, not the end of the script; `report` prints every failure and the summary
line run.sh shows, and returns the exit code (0 = all passed).

A script imports it by name: run as `python3 deploy/tests/test_x.py`, its own directory is
first on sys.path.
"""

FAILURES = []
PASSES = 0


def check(name, cond, detail=""):
    global PASSES
    if cond:
        PASSES += 1
    else:
        FAILURES.append(f"{name}{': ' + str(detail) if detail != '' else ''}")


def eq(name, got, want):
    check(name, got == want, f"got {got!r}, want {want!r}")


def guarded(test, name=None):
    """`test()`'s result, or None when it raised (recorded as a failure)."""
    try:
        return test()
    except Exception as e:  # a crash is a failure of that group
        FAILURES.append(f"{name or getattr(test, '__name__', 'test')} raised {type(e).__name__}: {e}")
        return None


def run(script, tests):
    """Runs every group in `tests` under `guarded`, then `report(script)`."""
    for t in tests:
        guarded(t)
    return report(script)


def report(script):
    for f in FAILURES:
        print(f"FAIL {f}")
    print(f"{script}: {PASSES} passed, {len(FAILURES)} failed")
    return 1 if FAILURES else 0
