"""The one reporter the OpenAI test scripts share: each check runs, every
failure is kept (the rest still run), and the last line is the count the
Rust test reads: `N passed, M failed`."""
import sys

failures = []
passed = 0


def check(name, fn):
    global passed
    try:
        fn()
        passed += 1
        print(f"ok {name}")
    except Exception as e:  # noqa: BLE001 - report every failure, keep going
        failures.append(f"FAILED {name}: {type(e).__name__}: {e}")


def report():
    """Prints the failures and the count; exits 1 if any check failed."""
    for f in failures:
        print(f)
    print(f"{passed} passed, {len(failures)} failed")
    sys.exit(1 if failures else 0)
