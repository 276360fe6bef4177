"""Run one phase of the test command and print its duration: `python -m tests.support.phase NAME -- CMD`."""

from __future__ import annotations

import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") != 1:
        print("usage: python -m tests.support.phase NAME -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    name, command = argv[0], argv[2:]
    started = time.monotonic()
    print(f"==> phase {name}: {' '.join(command)}", flush=True)
    returncode = subprocess.call(command)
    status = "ok" if returncode == 0 else f"FAILED (exit {returncode})"
    print(f"<== phase {name}: {status} in {time.monotonic() - started:.0f} s", flush=True)
    return returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
