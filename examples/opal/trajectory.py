#!/usr/bin/env python3
"""The Opal seed's example model: a point moved by a control u over a period of time.

To wrap your own program the same way:
  1. describe its parameters in INFO (`name = type [choice [..]] [default v]
     [partition a to b by s] [comment text]`, under `main` and one section per algorithm);
  2. write calculate(request, progress): read the parameters from request["main"] and
     request["algo"], call progress(fraction, comment) now and then, and return
     (header, rows) -- the columns' types and the result table;
  3. call opal.serve(INFO, calculate). `python3 trajectory.py --info` prints INFO; run
     without arguments it answers `calculate` and `status` requests on stdin.
"""
import math
import random
import time

import opal

INFO = """meta = { detailed = true }
main = {
  size = int default 100 comment number of time steps
  x = float default 20.0 comment start x
  y = float default 0.0 comment start y
  time = period default 00:00 to 24:00 comment twenty-four hours
}
algo = {
  genetic = {
    method = string choice [std, last] default std comment keep the best or the last improvement
    poplulation = int default 1000 comment candidate controls tried at each step
  }
  bellman = {
    xpart = float partition 0 to 100 by 1 default 0 comment target x
    ypart = float partition 0 to 50 by 0.5 default 0 comment target y
  }
}"""

SPEED = 2.0       # the largest control: distance per hour
STEP_PAUSE = 0.01  # seconds per step, so that progress can be watched at the defaults


def minutes(clock):
    hours, mins = clock.split(":")
    return int(hours) * 60 + int(mins)


def cost(x, y, tx, ty, u, dt):
    """Distance to the target after one step at speed u, plus a price on effort."""
    d = math.hypot(x - tx, y - ty) or 1.0
    nx, ny = x + (tx - x) / d * u * dt, y + (ty - y) / d * u * dt
    return math.hypot(nx - tx, ny - ty) + 0.05 * u * u, nx, ny


def calculate(request, progress):
    main = request["main"]
    (name, params), = request["algo"].items()
    size, x, y = int(main["size"]), float(main["x"]), float(main["y"])
    start, end = (minutes(c) for c in main["time"].split(" to "))
    dt = (end - start) / 60 / max(size, 1)
    if name == "genetic":
        tx = ty = 0.0
        population, keep_last = int(params["poplulation"]), params["method"] == "last"
        rng = random.Random(size)
    else:
        tx, ty = float(params["xpart"]), float(params["ypart"])
        grid = [SPEED * k / 100 for k in range(101)]
    rows, u = [], 0.0
    for step in range(size + 1):
        t = start + step * (end - start) / max(size, 1)
        rows.append([f"{int(t) // 60:02d}:{int(t) % 60:02d}", f"{x:.4f}", f"{y:.4f}", f"{u:.4f}"])
        if step == size:
            break
        if name == "genetic":
            # Mutate the current control; keep the best candidate or the last improvement.
            best, best_u = cost(x, y, tx, ty, u, dt)[0], u
            for _ in range(population):
                cand = min(SPEED, max(0.0, best_u + rng.gauss(0, 0.3)))
                c = cost(x, y, tx, ty, cand, dt)[0]
                if c < best:
                    best, best_u = c, cand
                    if keep_last:
                        break
            u = best_u
        else:
            # One step of Bellman's principle over a grid of controls.
            u = min(grid, key=lambda v: cost(x, y, tx, ty, v, dt)[0])
        _, x, y = cost(x, y, tx, ty, u, dt)
        progress((step + 1) / size, f"step {step + 1} of {size}, "
                 f"{math.hypot(x - tx, y - ty):.2f} from the target")
        time.sleep(STEP_PAUSE)
    header = {"time": "datetime", "x": "float", "y": "float", "u": "float comment management"}
    return header, rows


if __name__ == "__main__":
    opal.serve(INFO, calculate)
