#!/usr/bin/env python3
"""Runs smtp-sink as the benchmark's upstream and timestamps what it receives.

    sinkmon.py EVENTS_FILE PIDFILE -- smtp-sink ARGS...

smtp-sink runs with -v, which makes it print every SMTP command it receives (never
the message data) on stderr. This process reads that stream in large chunks and
appends to EVENTS_FILE, once per chunk read:

    D <unix_ns> <transactions> <recipients>   cumulative "." and "RCPT TO" counts
    P <unix_ns> <probe id>                     a probe's MAIL FROM:<probe-ID@...>

The timestamp is the moment the chunk was read from the pipe (well under a
millisecond after smtp-sink printed it when this reader keeps up, which it does:
it does nothing else). Counting from smtp-sink's own output, rather than dumping
messages to disk (-d/-D), keeps the sink as fast as it can be.
"""
import os
import signal
import subprocess
import sys
import time


def main():
    events_path, pidfile = sys.argv[1], sys.argv[2]
    cmd = sys.argv[sys.argv.index("--") + 1:]
    sink = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    with open(pidfile, "w") as f:
        f.write(f"{sink.pid}\n")

    def stop(*_):
        if sink.poll() is None:
            sink.terminate()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    out = open(events_path, "w", buffering=1 << 16)
    out.write(f"D {time.time_ns()} 0 0\n")
    out.flush()
    fd = sink.stderr.fileno()
    dots = rcpts = 0
    rest = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except InterruptedError:
            continue
        if not chunk:
            break
        now = time.time_ns()
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        before = (dots, rcpts)
        for line in lines:
            # "smtp-sink: ." / "smtp-sink: RCPT TO:<...>" / "smtp-sink: MAIL FROM:<...>",
            # the command as the client spelled it (smtplib writes "mail FROM:").
            if line.endswith(b": ."):
                dots += 1
                continue
            low = line.lower()
            if b": rcpt to:" in low:
                rcpts += 1
            elif b": mail from:<probe-" in low:
                pid = line[low.index(b"<probe-") + 7:].split(b"@", 1)[0]
                out.write(f"P {now} {pid.decode(errors='replace')}\n")
            elif b": fatal:" in low or b": panic:" in low:
                sys.stderr.write(line.decode(errors="replace") + "\n")
        if (dots, rcpts) != before:
            out.write(f"D {now} {dots} {rcpts}\n")
        out.flush()
    out.close()
    sink.wait()


if __name__ == "__main__":
    main()
