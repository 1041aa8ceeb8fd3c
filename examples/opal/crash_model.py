#!/usr/bin/env python3
"""An Opal model that dies: it accepts `calculate`, then writes why to stderr and exits
with status 3 before answering any `status`, as a model with a bug does."""
import sys

import opal

INFO = """main = {
  steps = int default 10
}"""

if __name__ == "__main__":
    if sys.argv[1:2] in (["-i"], ["--info"]):
        print(INFO)
        sys.exit(0)
    while (text := opal.read_message()) is not None:
        if opal.parse(text).get("request") == "calculate":
            opal.answer(status="inprogress")
            print("crash_model: simulated failure: segmentation of the grid failed at step 1",
                  file=sys.stderr, flush=True)
            sys.exit(3)
