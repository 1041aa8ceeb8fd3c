#!/usr/bin/env python3
"""The smallest Opal model: answers `calculate` with its table at once (n rows of i, i*i).
The benchmark runs it through the cluster and by hand to measure what the cluster adds."""
import re
import sys

INFO = "main = { n = int default 3 comment rows in the table }"


def read_message(stream):
    """One brace-balanced message from `stream`, or None at its end."""
    text, depth = "", 0
    while True:
        ch = stream.read(1)
        if not ch:
            return None
        if ch == "{":
            depth += 1
        if depth:
            text += ch
        if ch == "}":
            depth -= 1
            if depth == 0:
                return text


def main():
    if sys.argv[1:] in (["--info"], ["-i"]):
        print(INFO)
        return
    while True:
        request = read_message(sys.stdin)
        if request is None:
            return
        found = re.search(r"\bn\s*=\s*(\d+)", request)
        n = int(found.group(1)) if found else 3
        rows = "\n".join(f"    {i} {i * i}" for i in range(n))
        print("{ answer = ok status = ready\n  header = { i = int square = int }\n"
              f"  table = {{\n{rows} }} }}", flush=True)


if __name__ == "__main__":
    main()
