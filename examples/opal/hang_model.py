#!/usr/bin/env python3
"""An Opal model that hangs: it accepts `calculate` and then never answers again, as a
model stuck in a loop does. Only a timeout or a cancel ends it."""
import sys
import time

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
            while True:  # status requests pile up unread on stdin
                time.sleep(3600)
