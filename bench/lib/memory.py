#!/usr/bin/env python3
"""The memory checks of bench/run, against a freshly started optgate.

    memory.py idle --port P --pid PID --count 1000 --out FILE
        VmRSS before; COUNT connections opened, each waiting until it has read the
        220 greeting (so the server has a session for it); 2 s to settle; VmRSS again.
        The delta is what the idle clients cost.
    memory.py big --port P --pid PID --mb 50 --events SINK_EVENTS --out FILE
        One message of about MB megabytes (a short text part and a base64
        attachment, 76-character lines) to destinataire@example.net; waits until the
        sink has it; the peak RSS (VmHWM, reset just before) against the size.
"""
import argparse
import json
import os
import smtplib
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from case import Events, rss_kb  # noqa: E402


def idle(a):
    time.sleep(1)
    before = rss_kb(a.pid, "VmRSS")
    socks, refused = [], 0
    t0 = time.monotonic()
    for _ in range(a.count):
        s = socket.create_connection(("127.0.0.1", a.port), timeout=30)
        socks.append(s)
    for s in socks:
        greeting = b""
        while not greeting.endswith(b"\r\n"):
            chunk = s.recv(512)
            if not chunk:
                break
            greeting += chunk
        if not greeting.startswith(b"220"):
            refused += 1
    opened = time.monotonic() - t0
    time.sleep(2)
    after = rss_kb(a.pid, "VmRSS")
    threads = len(os.listdir(f"/proc/{a.pid}/task"))
    for s in socks:
        try:
            s.sendall(b"QUIT\r\n")
        except OSError:
            pass
        s.close()
    time.sleep(1)
    released = rss_kb(a.pid, "VmRSS")
    result = {
        "test": "idle",
        "connections": a.count,
        "refused": refused,
        "open_s": round(opened, 2),
        "rss_before_mb": before / 1024,
        "rss_with_idle_mb": after / 1024,
        "rss_after_close_mb": released / 1024,
        "delta_mb": (after - before) / 1024,
        "threads": threads,
    }
    print(f"  {a.count} idle connections ({refused} not greeted with 220): RSS "
          f"{before / 1024:.1f} MB -> {after / 1024:.1f} MB (+{(after - before) / 1024:.1f} MB), "
          f"{released / 1024:.1f} MB after they quit", flush=True)
    return result


def big_message(mb):
    target = int(mb * 1024 * 1024)
    head = (b"From: Boutique <newsletter@example.com>\r\n"
            b"To: <destinataire@example.net>\r\n"
            b"Subject: The catalogue, in full\r\n"
            b"Date: Tue, 02 Sep 2025 09:30:00 +0200\r\n"
            b"Message-ID: <big-catalogue@mail.example.com>\r\n"
            b"MIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"=_big\"\r\n\r\n"
            b"--=_big\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            b"Our whole catalogue is attached.\r\n\r\n"
            b"--=_big\r\nContent-Type: application/pdf; name=\"catalogue.pdf\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=\"catalogue.pdf\"\r\n\r\n")
    tail = b"--=_big--\r\n"
    # Pseudo-random base64 lines (a real attachment does not compress either).
    import base64
    import random
    rng = random.Random(7)
    block = base64.b64encode(rng.randbytes(57 * 1024))
    lines = [block[i:i + 76] + b"\r\n" for i in range(0, len(block), 76)]
    chunk = b"".join(lines)
    body_len = target - len(head) - len(tail)
    reps, extra = divmod(body_len, len(chunk))
    body = chunk * reps + b"".join(lines[: extra // 78])
    return head + body + tail


def big(a):
    msg = big_message(a.mb)
    events = Events(a.events)
    base = events.dots
    try:
        with open(f"/proc/{a.pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    time.sleep(0.5)
    before = rss_kb(a.pid, "VmRSS")
    t0 = time.monotonic()
    with smtplib.SMTP("127.0.0.1", a.port, timeout=300) as s:
        s.ehlo("big.example")
        s.mail("probe-bigmessage@example.com",
               [f"SIZE={len(msg)}"] if s.has_extn("size") else [])
        s.rcpt("destinataire@example.net")
        code, resp = s.data(msg)
    accepted = time.monotonic() - t0
    deadline = time.monotonic() + 300
    while events.dots < base + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        events.poll()
    delivered = time.monotonic() - t0 if events.dots >= base + 1 else None
    time.sleep(0.5)
    peak = rss_kb(a.pid, "VmHWM")
    size_mb = len(msg) / 1024 / 1024
    result = {
        "test": "big",
        "size_mb": size_mb,
        "reply": f"{code} {resp.decode(errors='replace')}",
        "accepted_s": round(accepted, 2),
        "delivered_s": None if delivered is None else round(delivered, 2),
        "rss_before_mb": before / 1024,
        "peak_rss_mb": peak / 1024,
        "peak_over_size": peak / 1024 / size_mb,
    }
    print(f"  one {size_mb:.1f} MB message: {code}, accepted in {accepted:.1f} s, "
          f"{'delivered in %.1f s' % delivered if delivered else 'NOT delivered'}; "
          f"peak RSS {peak / 1024:.1f} MB = {peak / 1024 / size_mb:.2f}x its size", flush=True)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("test", choices=["idle", "big"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--mb", type=float, default=50)
    ap.add_argument("--events")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    result = idle(a) if a.test == "idle" else big(a)
    with open(a.out, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
