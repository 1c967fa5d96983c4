#!/usr/bin/env python3
"""One measured case of bench/run: a setup, a recipient count, a message count.

Sends the load with smtp-source (the same client, message and concurrency for every
setup), and beside it a low-rate probe stream (Python smtplib, one connection per
probe) whose envelope sender names the probe: `probe-ID@example.com`. The sink
monitor (sinkmon.py) timestamps each `MAIL FROM:<probe-ID@…>` it sees, so a probe's
end-to-end latency is: the sink received the relayed copy's MAIL FROM, minus the
moment the probe client sent its own MAIL FROM. For a split copy (optgate makes one
transaction per recipient) it is the last of the copies.

Then it waits until the sink has received every transaction it should (the load's
and the probes'), and writes one JSON object (one line) to --out.

CPU: the seconds each process group used during the case (a group is a process and
its descendants, children already reaped included), the machine's busy and iowait
share from /proc/stat, and for optgate the average number of its threads running
(R) and waiting on the disk (D), sampled every 50 ms.
"""
import argparse
import json
import os
import resource
import smtplib
import subprocess
import sys
import threading
import time

CLK = os.sysconf("SC_CLK_TCK")


class Events:
    """Follows the sink monitor's events file."""

    def __init__(self, path):
        self.f = open(path, "r")
        self.rest = ""
        self.dots = self.rcpts = 0
        self.history = []  # (ns, dots, rcpts)
        self.probes = {}  # id -> [ns, ...]
        self.poll()

    def poll(self):
        data = self.f.read()
        if not data:
            return
        lines = (self.rest + data).split("\n")
        self.rest = lines.pop()
        for line in lines:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "D":
                ts, self.dots, self.rcpts = int(parts[1]), int(parts[2]), int(parts[3])
                self.history.append((ts, self.dots, self.rcpts))
            elif parts[0] == "P":
                self.probes.setdefault(parts[2], []).append(int(parts[1]))

    def reached(self, dots):
        """When the sink's transaction count first reached `dots`."""
        for ts, d, r in self.history:
            if d >= dots:
                return ts, r
        return None, None


def proc_stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rindex(")") + 2:].split()
    return {
        "state": fields[0],
        "ppid": int(fields[1]),
        "cpu": sum(int(x) for x in fields[11:15]) / CLK,  # utime stime cutime cstime
    }


def tree_cpu(root):
    """CPU seconds of `root` and all its live descendants (reaped ones are in cutime)."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st:
                stats[int(name)] = st
    children = {}
    for pid, st in stats.items():
        children.setdefault(st["ppid"], []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid]["cpu"]
            todo.extend(children.get(pid, []))
    return total


def system_cpu():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle, iowait = v[3], v[4]
    return sum(v[:8]), idle, iowait


def rss_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None


class ThreadSampler(threading.Thread):
    """Samples the run state of every thread of `pid`, grouped by thread name."""

    def __init__(self, pid, period=0.05):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.stop = threading.Event()
        self.samples = 0
        self.counts = {}  # (comm group, state) -> count
        self.cpu = {}  # tid -> [first seen cpu seconds, last seen, name]
        self.started = self.ended = None
        self.series = []  # (unix ns, process cpu seconds, machine (total, idle+iowait) jiffies)

    def run(self):
        self.started = time.monotonic()
        while not self.stop.wait(self.period):
            self.ended = time.monotonic()
            try:
                tids = os.listdir(f"/proc/{self.pid}/task")
            except OSError:
                return
            self.samples += 1
            st = proc_stat(self.pid)
            if st:
                total, idle, iowait = system_cpu()
                self.series.append((time.time_ns(), st["cpu"], total, idle + iowait))
            for tid in tids:
                try:
                    with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                        s = f.read()
                except OSError:
                    continue
                comm = s[s.index("(") + 1:s.rindex(")")]
                # tokio-runtime-w(orker), blocking-pool threads share a name; digits go
                group = comm.rstrip("0123456789-") or comm
                fields = s[s.rindex(")") + 2:].split()
                state = fields[0]
                cpu = (int(fields[11]) + int(fields[12])) / CLK
                seen = self.cpu.setdefault(tid, [cpu, cpu, comm])
                seen[1] = cpu
                key = (group, state)
                self.counts[key] = self.counts.get(key, 0) + 1

    def summary(self):
        out = {}
        for (group, state), n in self.counts.items():
            g = out.setdefault(group, {"threads": 0.0, "R": 0.0, "D": 0.0})
            g["threads"] += n / max(self.samples, 1)
            if state in ("R", "D"):
                g[state] += n / max(self.samples, 1)
        return {g: {k: round(v, 2) for k, v in d.items()} for g, d in out.items()}

    def phase(self, t0, t1):
        """optgate's cores and the machine's busy share between two unix-ns instants."""
        pts = [p for p in self.series if t0 <= p[0] <= t1]
        if len(pts) < 2:
            return None
        (a, ca, ta, ia), (b, cb, tb, ib) = pts[0], pts[-1]
        return {"seconds": round((b - a) / 1e9, 2), "optgate_cores": round((cb - ca) / ((b - a) / 1e9), 3),
                "busy": round(1 - (ib - ia) / (tb - ta), 3) if tb > ta else None}

    def busiest(self, n=4):
        """The threads that used the most CPU while sampled, in cores."""
        span = (self.ended or 0) - (self.started or 0)
        if span <= 0:
            return []
        used = sorted(((last - first) / span, name) for first, last, name in self.cpu.values())
        return [{"name": name, "cores": round(c, 3)} for c, name in reversed(used[-n:])]


class Probes:
    def __init__(self, host, port, rate, rcpts, message, tag, max_inflight=8):
        self.host, self.port, self.rate = host, port, rate
        self.rcpts, self.message, self.tag = rcpts, message, tag
        self.sem = threading.Semaphore(max_inflight)
        self.max_inflight = max_inflight
        self.stop = threading.Event()
        self.sent = {}  # id -> (mail_ns, accepted_ns)
        self.errors = []
        self.skipped = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def start(self):
        if self.rate > 0:
            self.thread.start()

    def loop(self):
        interval = 1.0 / self.rate
        next_t = time.monotonic()
        seq = 0
        while not self.stop.is_set():
            now = time.monotonic()
            if now < next_t:
                self.stop.wait(next_t - now)
                continue
            next_t += interval
            if not self.sem.acquire(blocking=False):
                self.skipped += 1
                continue
            seq += 1
            threading.Thread(target=self.one, args=(f"{self.tag}x{seq}",), daemon=True).start()

    def one(self, pid):
        try:
            tc = time.time_ns()
            with smtplib.SMTP(self.host, self.port, timeout=120) as s:
                # The greeting is in: a relay that holds new sessions back while it is
                # busy (optgate's backpressure) makes them wait here, before MAIL.
                tg = time.time_ns()
                s.ehlo("probe.example")
                t0 = time.time_ns()
                code, resp = s.mail(f"probe-{pid}@example.com")
                if code != 250:
                    raise RuntimeError(f"MAIL: {code} {resp!r}")
                for r in self.rcpts:
                    code, resp = s.rcpt(r)
                    if code not in (250, 251):
                        raise RuntimeError(f"RCPT: {code} {resp!r}")
                code, resp = s.data(self.message)
                t1 = time.time_ns()
                if code != 250:
                    raise RuntimeError(f"DATA: {code} {resp!r}")
                with self.lock:
                    self.sent[pid] = (t0, t1, tc, tg)
        except Exception as e:  # noqa: BLE001 - a failed probe is reported, not fatal
            with self.lock:
                self.errors.append(f"{pid}: {e}")
        finally:
            self.sem.release()

    def finish(self, timeout):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        deadline = time.monotonic() + timeout
        got = 0
        while got < self.max_inflight and time.monotonic() < deadline:
            if self.sem.acquire(timeout=max(0.01, deadline - time.monotonic())):
                got += 1


def percentile(values, p):
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--setup", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--messages", type=int, required=True)
    ap.add_argument("--rcpts", type=int, default=1)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--split", action="store_true",
                    help="the setup relays one transaction per recipient (optgate)")
    ap.add_argument("--message-file", required=True)
    ap.add_argument("--sender", default="sender@example.com")
    ap.add_argument("--to", default="destinataire@example.net")
    ap.add_argument("--events", default="",
                    help="the sink monitor's file; none: a plain sink, time the client only")
    ap.add_argument("--probe-rate", type=float, default=20)
    ap.add_argument("--stall-timeout", type=float, default=60)
    ap.add_argument("--cpu", action="append", default=[], help="NAME=PID (process tree)")
    ap.add_argument("--rss-pid", type=int, help="optgate: peak RSS and thread states")
    ap.add_argument("--tag", default=None, help="probe id prefix (default: unique)")
    ap.add_argument("--warmup", action="store_true")
    ap.add_argument("--round", type=int, default=1, help="which round of bench/run")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    local, domain = a.to.split("@")
    rcpts = [a.to] + [f"{i}{local}@{domain}" for i in range(2, a.rcpts + 1)]
    with open(a.message_file, "rb") as f:
        message = f.read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    per_msg = a.rcpts if a.split else 1

    events = Events(a.events or "/dev/null")
    base_dots, base_rcpts = events.dots, events.rcpts
    groups = {}
    for spec in a.cpu:
        name, pid = spec.split("=")
        groups[name] = int(pid)
    cpu0 = {n: tree_cpu(p) for n, p in groups.items()}
    sys0 = system_cpu()
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sampler = None
    if a.rss_pid:
        # Resets VmHWM to the current RSS, so the peak read at the end is this case's.
        try:
            with open(f"/proc/{a.rss_pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        rss_start = rss_kb(a.rss_pid, "VmRSS")
        sampler = ThreadSampler(a.rss_pid)
        sampler.start()

    tag = a.tag or f"{a.setup}{a.rcpts}r{time.time_ns() // 1_000_000 % 100_000_000}"
    probes = Probes(a.host, a.port, 0 if a.warmup or not a.events else a.probe_rate,
                    rcpts, message, tag)
    cmd = ["smtp-source", "-F", a.message_file, "-s", str(a.sessions), "-m", str(a.messages),
           "-r", str(a.rcpts), "-f", a.sender, "-t", a.to, f"{a.host}:{a.port}"]
    t_start = time.time_ns()
    probes.start()
    client = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    t_client = time.time_ns()
    probes.finish(timeout=120)
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)

    expected = a.messages * per_msg + len(probes.sent) * per_msg
    if not a.events:  # a plain sink: it has it all when the client is done
        events.history.append((t_client, base_dots + expected, base_rcpts + a.messages * a.rcpts))
        events.dots, events.rcpts = base_dots + expected, base_rcpts + a.messages * a.rcpts
    target = base_dots + expected
    last_progress, last_dots = time.monotonic(), events.dots
    while events.dots < target:
        time.sleep(0.02)
        events.poll()
        if events.dots != last_dots:
            last_progress, last_dots = time.monotonic(), events.dots
        elif time.monotonic() - last_progress > a.stall_timeout:
            break
    time.sleep(0.05)
    events.poll()
    t_done, rcpts_at_done = events.reached(target)
    complete = t_done is not None
    if not complete:
        t_done = events.history[-1][0] if events.history else time.time_ns()
        rcpts_at_done = events.rcpts

    cpu1 = {n: tree_cpu(p) for n, p in groups.items()}
    sys1 = system_cpu()
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    wall = (t_done - t_start) / 1e9
    delivered = min(events.dots, target) - base_dots
    result = {
        "setup": a.setup,
        "rcpts": a.rcpts,
        "messages": a.messages,
        "sessions": a.sessions,
        "warmup": a.warmup,
        "round": a.round,
        "client_rc": client.returncode,
        "client_stderr": client.stderr.decode(errors="replace")[-2000:],
        "client_wall_s": (t_client - t_start) / 1e9,
        "accepted_msgs_per_s": a.messages / ((t_client - t_start) / 1e9),
        "complete": complete,
        "expected_transactions": expected,
        "delivered_transactions": delivered,
        "delivered_rcpts": (rcpts_at_done or events.rcpts) - base_rcpts,
        "deliver_wall_s": wall,
        "delivered_copies_per_s": delivered / wall if wall > 0 else None,
        "delivered_rcpts_per_s": ((rcpts_at_done or events.rcpts) - base_rcpts) / wall
        if wall > 0 else None,
    }
    # Latency per probe: the last copy's arrival at the sink minus its MAIL FROM.
    # Also counted from the connection, greeting wait included.
    lat, from_connect, missing = [], [], 0
    for pid, (t0, _t1, tc, _tg) in probes.sent.items():
        arrivals = [t for t in events.probes.get(pid, []) if t >= t0]
        if len(arrivals) < per_msg:
            missing += 1
            continue
        lat.append((max(arrivals) - t0) / 1e6)
        from_connect.append((max(arrivals) - tc) / 1e6)
    accept = [(t1 - t0) / 1e6 for t0, t1, _tc, _tg in probes.sent.values()]
    greeting = [(tg - tc) / 1e6 for _t0, _t1, tc, tg in probes.sent.values()]
    result["probes"] = {
        "sent": len(probes.sent),
        "measured": len(lat),
        "missing": missing,
        "errors": len(probes.errors),
        "first_errors": probes.errors[:3],
        "skipped": probes.skipped,
        "rate": a.probe_rate,
    }
    result["latency_ms"] = {
        "p50": percentile(lat, 50),
        "p90": percentile(lat, 90),
        "p99": percentile(lat, 99),
        "max": max(lat) if lat else None,
    }
    result["accept_latency_ms"] = {"p50": percentile(accept, 50), "p99": percentile(accept, 99)}
    result["greeting_wait_ms"] = {"p50": percentile(greeting, 50), "p99": percentile(greeting, 99)}
    result["latency_from_connect_ms"] = {
        "p50": percentile(from_connect, 50),
        "p99": percentile(from_connect, 99),
    }
    cores = {n: (cpu1[n] - cpu0[n]) / wall for n in groups} if wall > 0 else {}
    cores["client"] = ((kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)) / wall
    cores["probes+bench"] = ((self1.ru_utime + self1.ru_stime)
                             - (self0.ru_utime + self0.ru_stime)) / wall
    result["cores"] = {k: round(v, 3) for k, v in cores.items()}
    total = sys1[0] - sys0[0]
    busy = 1 - (sys1[1] - sys0[1] + sys1[2] - sys0[2]) / total if total else None
    if busy is not None:
        # what everything else on the machine (other users' work) took meanwhile
        cores["other"] = max(0.0, busy * os.cpu_count() - sum(cores.values()))
        result["cores"]["other"] = round(cores["other"], 3)
    result["machine"] = {
        "busy": round(busy, 3) if busy is not None else None,
        "iowait": round((sys1[2] - sys0[2]) / total, 3) if total else None,
        "loadavg": open("/proc/loadavg").read().split()[:3],
    }
    if a.rss_pid:
        sampler.stop.set()
        sampler.join()
        result["rss"] = {
            "start_mb": (rss_start or 0) / 1024,
            "peak_mb": (rss_kb(a.rss_pid, "VmHWM") or 0) / 1024,
            "end_mb": (rss_kb(a.rss_pid, "VmRSS") or 0) / 1024,
        }
        result["threads"] = sampler.summary()
        result["busiest_threads"] = sampler.busiest()
        result["phases"] = {"while the client sends": sampler.phase(t_start, t_client),
                            "after it, draining the queue": sampler.phase(t_client, t_done)}
    with open(a.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    notes = []
    if not complete:
        notes.append(f"INCOMPLETE: {delivered}/{expected} transactions at the sink")
    if client.returncode != 0:
        last = result["client_stderr"].strip().splitlines()
        notes.append(f"client exit {client.returncode}: {last[-1] if last else ''}")
    if probes.errors:
        notes.append(f"{len(probes.errors)} probe errors: {probes.errors[0]}")
    print(f"  {'warm-up' if a.warmup else f'round {a.round}'} {a.setup:<8} {a.rcpts:>2} rcpt {a.messages:>6} msgs: "
          f"accepted {result['accepted_msgs_per_s']:7.1f} msgs/s, "
          f"delivered {result['delivered_copies_per_s'] or 0:7.1f} copies/s, "
          f"p50 {fmt(result['latency_ms']['p50'])}, p99 {fmt(result['latency_ms']['p99'])}"
          + ("" if not notes else "  -- " + "; ".join(notes)), flush=True)
    return 0


def fmt(v):
    return "-" if v is None else f"{v:.1f} ms"


if __name__ == "__main__":
    sys.exit(main())
