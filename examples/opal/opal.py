"""Opal for Python models, standard library only: read requests from stdin, write answers
to stdout (docs/opal.md has the format). Copy this file next to your model and call
serve(info, calculate) -- see trajectory.py for a whole model.

Messages are `{ key = value ... }`: a value is a section `{ ... }`, a list `[a, b]`, or
text running to the end of the line (or a `}`, a `// comment`, or the next `key =`).
A backslash takes the next character literally.
"""
import re
import sys
import threading

_KEY = re.compile(r"[\w-]+")
_KEY_AHEAD = re.compile(r"[\w-]+[ \t]*=")


def read_message(stream=sys.stdin):
    """The next brace-balanced message's text, or None at end of input."""
    text, depth, started = "", 0, False
    for line in stream:
        text += line
        i = 0
        while i < len(line):
            c = line[i]
            if c == "\\":
                i += 1
            elif c == "/" and line.startswith("//", i) and (i == 0 or line[i - 1] in " \t{}[],="):
                break
            elif c == "{":
                depth, started = depth + 1, True
            elif c == "}":
                depth -= 1
            i += 1
        if started and depth <= 0:
            return text
    return None


def parse(text):
    """A message as a dict: sections are dicts, lists lists, text str, tables lists of rows."""
    pos = text.index("{") + 1
    value, _ = _section(text, pos)
    return value


def _section(t, i, table=False):
    out, rows, row = {}, [], []
    while True:
        while i < len(t) and (t[i] in " \t\r\n" or t.startswith("//", i)):
            if t[i] == "\n" and table and row:
                rows.append(row)
                row = []
            i = t.find("\n", i) if t.startswith("//", i) else i + 1
            i = len(t) if i < 0 else i
        if i >= len(t) or t[i] == "}":
            return (rows + ([row] if row else []) if table else out), i + 1
        if table:
            cell, i = _text(t, i, " \t\r\n}")
            row.append(cell)
            continue
        key = _KEY.match(t, i).group()
        i = t.index("=", i + len(key)) + 1
        while t[i] in " \t":
            i += 1
        if t[i] == "{":
            out[key], i = _section(t, i + 1, table=(key == "table"))
        elif t[i] == "[":
            end = t.index("]", i)
            items = [s.strip() for s in t[i + 1:end].split(",")]
            out[key], i = ([] if items == [""] else items), end + 1
        else:
            out[key], i = _text(t, i, "\n}", scalar=True)


def _text(t, i, stops, scalar=False):
    out, keep, word_start = [], 0, True
    while i < len(t) and t[i] not in stops:
        if word_start and (t.startswith("//", i) or (scalar and _KEY_AHEAD.match(t, i))):
            break
        word_start = t[i] in " \t\r"
        if t[i] == "\\" and i + 1 < len(t):
            out.append({"n": "\n", "t": "\t", "r": "\r"}.get(t[i + 1], t[i + 1]))
            i += 2
        else:
            out.append(t[i])
            i += 1
        keep = keep if word_start else len(out)
    return "".join(out[:keep]), i


def _escape(s, cell=False):
    s = str(s).replace("\\", "\\\\").replace("\n", "\\n")
    for c in "{}=" if not cell else "{}":
        s = s.replace(c, "\\" + c)
    s = s.replace("//", "\\//")
    return s.replace(" ", "\\ ") if cell else s


def format_message(pairs, indent="  "):
    """A message from a dict: dicts become sections, `table` a list of rows."""
    lines = []
    for key, value in pairs.items():
        if key == "table":
            rows = [indent + "  " + " ".join(_escape(c, cell=True) for c in r) for r in value]
            lines.append(indent + "table = {\n" + "\n".join(rows) + "\n" + indent + "}")
        elif isinstance(value, dict):
            lines.append(indent + key + " = " + format_message(value, indent + "  ").strip())
        else:
            lines.append(indent + key + " = " + _escape(value))
    return "{\n" + "\n".join(lines) + "\n" + indent[2:] + "}"


def answer(**pairs):
    sys.stdout.write(format_message({"answer": "ok", **pairs}) + "\n")
    sys.stdout.flush()


def serve(info, calculate):
    """Runs a model: `--info` prints `info`; otherwise answers info, calculate and status
    requests on stdin. calculate(request, progress) does the work and returns
    (header, rows); it calls progress(fraction, comment) as it goes."""
    if len(sys.argv) > 1 and sys.argv[1] in ("-i", "--info"):
        print(info)
        return
    state = {"fraction": 0.0, "comment": "starting", "result": None, "error": None}
    lock, worker = threading.Lock(), None

    def progress(fraction, comment):
        with lock:
            state["fraction"], state["comment"] = fraction, comment

    def run(request):
        try:
            result = calculate(request, progress)
            with lock:
                state["result"] = result
        except Exception as e:  # the model's own words go back as the answer
            with lock:
                state["error"] = f"{type(e).__name__}: {e}"

    while (text := read_message()) is not None:
        try:
            request = parse(text).get("request")
        except (ValueError, AttributeError, IndexError) as e:
            request = f"an unreadable request ({e})"
        if request == "info":
            sys.stdout.write("{ answer = ok\n" + info + "\n}\n")
            sys.stdout.flush()
        elif request == "calculate" and worker is None:
            worker = threading.Thread(target=run, args=(parse(text),), daemon=True)
            worker.start()
            answer(status="inprogress")
        elif request == "status" and worker is not None:
            with lock:
                s = dict(state)
            if s["error"]:
                sys.stdout.write(format_message({"answer": "error", "comment": s["error"]}) + "\n")
                sys.stdout.flush()
            elif s["result"]:
                header, rows = s["result"]
                answer(status="ready", header=header, table=rows)
            else:
                answer(status="inprogress", percent=f"{s['fraction']:.2f}", comment=s["comment"])
        else:
            why = "a calculation is already running" if request == "calculate" else f"cannot answer {request!r} now"
            sys.stdout.write(format_message({"answer": "error", "comment": why}) + "\n")
            sys.stdout.flush()
