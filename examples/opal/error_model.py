#!/usr/bin/env python3
"""An Opal model that refuses every calculation with `answer = error` and its reason:
what a model does when its parameters make no sense to it."""
import sys

import opal

INFO = """main = {
  divisor = int default 0 comment the calculation divides by this
}"""

if __name__ == "__main__":
    if sys.argv[1:2] in (["-i"], ["--info"]):
        print(INFO)
        sys.exit(0)
    while (text := opal.read_message()) is not None:
        request = opal.parse(text).get("request")
        if request == "calculate":
            divisor = opal.parse(text).get("main", {}).get("divisor")
            comment = f"cannot divide by {divisor}: the divisor must not be 0"
        else:
            comment = f"no calculation to report on ({request} before calculate)"
        sys.stdout.write(opal.format_message({"answer": "error", "comment": comment}) + "\n")
        sys.stdout.flush()
