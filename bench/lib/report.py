#!/usr/bin/env python3
"""Prints bench/run's tables from its results file (one JSON object a line).

    report.py RESULTS.jsonl --load-start "0.52 0.61 0.70" --load-end "..." [--info TEXT]
              [--signing DIVAN_OUTPUT]

With several rounds, each figure of the tables is the median over the rounds, and
each ratio against a target is taken within a round (the setups it compares ran
minutes apart at most) before its median is compared with the target.
"""
import argparse
import json
import os
import statistics
import sys

SETUPS = ["direct", "postfix", "optgate", "optgate-b"]
LABEL = {
    "direct": "smtp-source -> smtp-sink (the limit)",
    "postfix": "Postfix relay (durable queue)",
    "optgate": "optgate (RSA-2048, 100k consents, fsync)",
    "optgate-b": "optgate-b (BENCH_COMPARE's binary)",
    "direct-plain": "  (limit with smtp-sink without -v)",
}


def num(v, fmt="{:.0f}"):
    return "-" if v is None else fmt.format(v)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def verdict(ok):
    return "n/a" if ok is None else ("MET" if ok else "not met")


def cpu_per_copy(case, group="optgate"):
    """A group's cores divided by the case's delivered copies per second: seconds."""
    return None if case is None else ratio(case.get("cores", {}).get(group),
                                           case["delivered_copies_per_s"])


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def combine(rounds):
    """One case from its rounds: the medians of the figures the tables show, the
    round whose delivered rate is the median for the rest (threads, phases)."""
    ordered = sorted(rounds, key=lambda r: r["delivered_copies_per_s"] or 0)
    out = dict(ordered[(len(ordered) - 1) // 2])
    for key in ("accepted_msgs_per_s", "delivered_copies_per_s", "delivered_rcpts_per_s"):
        out[key] = median(r[key] for r in rounds)
    for key in ("latency_ms", "accept_latency_ms", "greeting_wait_ms", "latency_from_connect_ms"):
        if all(key in r for r in rounds):
            out[key] = {q: median(r[key][q] for r in rounds) for q in ("p50", "p99")}
    out["probes"] = dict(out["probes"], measured=sum(r["probes"]["measured"] for r in rounds))
    groups = {g for r in rounds for g in r.get("cores", {})}
    out["cores"] = {g: median(r.get("cores", {}).get(g) for r in rounds) for g in groups}
    out["machine"] = dict(out.get("machine") or {},
                          busy=median((r.get("machine") or {}).get("busy") for r in rounds))
    peaks = [r["rss"]["peak_mb"] for r in rounds if r.get("rss")]
    if peaks:
        out["rss"] = dict(out["rss"], peak_mb=max(peaks))
    out["complete"] = all(r["complete"] for r in rounds)
    out["delivered_transactions"] = sum(r["delivered_transactions"] for r in rounds)
    out["expected_transactions"] = sum(r["expected_transactions"] for r in rounds)
    out["client_rc"] = next((r["client_rc"] for r in rounds if r["client_rc"] != 0), 0)
    out["rounds"] = len(rounds)
    return out


def signing_seconds(path):
    """The median time of one RSA-2048 DKIM signature (`dkim/rsa`) in the output of
    `cargo bench --bench copy -- dkim`, in seconds; None if it is not there."""
    units = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
    with open(path, encoding="utf-8") as f:
        for line in f:
            # "   ╰─ rsa      298.1 µs      │ 801.3 µs      │ 322.4 µs      │ …":
            # the name and the fastest time, then slowest, median, mean.
            columns = line.split("│")
            if len(columns) > 2 and columns[0].split()[1:2] == ["rsa"]:
                value, unit = columns[2].split()
                return float(value) * units[unit]
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--load-start", default="?")
    ap.add_argument("--load-end", default="?")
    ap.add_argument("--info", default="")
    ap.add_argument("--signing", help="cargo bench --bench copy -- dkim's output")
    a = ap.parse_args()
    signing = signing_seconds(a.signing) if a.signing else None
    if a.signing and signing is None:
        print(f"report.py: no dkim/rsa median in {a.signing}: the ceilings are left out", file=sys.stderr)
    by_round, memory = {}, {}
    with open(a.results) as f:
        for line in f:
            r = json.loads(line)
            if "test" in r:
                memory[r["test"]] = r
            elif not r.get("warmup"):
                by_round.setdefault(r.get("round", 1), {})[(r["setup"], r["rcpts"])] = r
    rounds = [by_round[n] for n in sorted(by_round)]
    keys = {k for one in rounds for k in one}
    cases = {k: combine([one[k] for one in rounds if k in one]) for k in keys}

    out = []
    p = out.append
    if a.info:
        p(a.info)
    p(f"load average (1/5/15 min) at start: {a.load_start}; at end: {a.load_end}")
    p("")
    for rc in sorted({k[1] for k in cases}):
        # The header names the count of the setups other than the limit, which has
        # BENCH_DIRECT_SCALE times as many.
        same_rc = [(k[0], v) for k, v in cases.items() if k[1] == rc]
        any_case = next((v for s, v in same_rc if not s.startswith("direct")), same_rc[0][1])
        direct = cases.get(("direct", rc))
        direct_n = (f" (the limit: {direct['messages']})"
                    if direct and direct["messages"] != any_case["messages"] else "")
        p(f"== {rc} recipient{'s' if rc > 1 else ''} per message: {any_case['messages']} messages{direct_n}, "
          f"{any_case['sessions']} sessions, one connection per message"
          + (f"; medians of {len(rounds)} rounds" if len(rounds) > 1 else "") + " ==")
        p(f"{'setup':<43}{'accepted':>10}{'delivered':>11}{'rcpts':>9}{'p50':>9}{'p99':>9}"
          f"{'probes':>8}{'peak RSS':>10}  CPU cores: server/sink/client/others, busy, load")
        p(f"{'':<43}{'msgs/s':>10}{'copies/s':>11}{'/s':>9}{'ms':>9}{'ms':>9}{'':>8}{'MB':>10}")
        for s in SETUPS + ["direct-plain"]:
            r = cases.get((s, rc))
            if not r:
                continue
            lat = r["latency_ms"]
            cores = r.get("cores", {})
            server = cores.get("optgate", cores.get("postfix"))
            machine = r.get("machine") or {}
            cpu = (f"{num(server, '{:.2f}')}/{num(cores.get('sink'), '{:.2f}')}/"
                   f"{num(cores.get('client'), '{:.2f}')}/{num(cores.get('other'), '{:.2f}')}, "
                   f"{num(machine.get('busy'), '{:.0%}')}, {machine.get('loadavg', ['?'])[0]}"
                   if s != "direct-plain" else "")
            flag = ""
            if not r["complete"]:
                flag = f"  INCOMPLETE {r['delivered_transactions']}/{r['expected_transactions']}"
            if r["client_rc"] != 0:
                flag += f"  client exit {r['client_rc']}"
            delivered = r["delivered_copies_per_s"] if s != "direct-plain" else None
            rcpts = r["delivered_rcpts_per_s"] if s != "direct-plain" else None
            p(f"{LABEL[s]:<43}{num(r['accepted_msgs_per_s']):>10}{num(delivered):>11}"
              f"{num(rcpts):>9}{num(lat['p50'], '{:.1f}'):>9}{num(lat['p99'], '{:.1f}'):>9}"
              f"{r['probes']['measured'] if s != 'direct-plain' else '':>8}"
              f"{num((r.get('rss') or {}).get('peak_mb'), '{:.1f}'):>10}  {cpu}{flag}")
        og = cases.get(("optgate", rc))
        if og and og.get("threads"):
            th = ", ".join(f"{g}: {v['R']:.2f} runnable, {v['D']:.2f} in disk wait (of {v['threads']:.0f})"
                           for g, v in sorted(og["threads"].items(), key=lambda kv: -kv[1]["R"])
                           if v["R"] >= 0.01 or v["D"] >= 0.01)
            p(f"  optgate threads on average (state R = on a CPU or waiting for one): {th or 'all idle'}")
            if og.get("busiest_threads"):
                p("  optgate's busiest threads (cores): " + ", ".join(
                    f"{t['cores']:.2f}" for t in og["busiest_threads"])
                  + f" (of {num(og['cores'].get('optgate'), '{:.2f}')} for the process)")
            ph = [f"{name} ({v['seconds']:.1f} s): optgate {v['optgate_cores']:.2f} cores, machine {v['busy']:.0%} busy"
                  for name, v in (og.get("phases") or {}).items() if v and v["seconds"] >= 0.5]
            if ph:
                p("  " + "; ".join(ph))
            p(f"  optgate accept latency of the probes (MAIL FROM to 250 after DATA): "
              f"p50 {num(og['accept_latency_ms']['p50'], '{:.1f}')} ms, "
              f"p99 {num(og['accept_latency_ms']['p99'], '{:.1f}')} ms")
            # What the ratio to the limit is made of: the two cores are shared by
            # optgate, the sink and the client, each paying this much per copy.
            runs = [one[("optgate", rc)] for one in rounds if ("optgate", rc) in one]

            def per_copy(group):
                ms = median(cpu_per_copy(r, group) for r in runs)
                return num(ms and ms * 1000, "{:.2f}")
            p(f"  CPU per delivered copy (median of the rounds): optgate {per_copy('optgate')} ms, "
              f"the sink {per_copy('sink')} ms, the client {per_copy('client')} ms")
        for s in ("postfix", "optgate"):
            r = cases.get((s, rc))
            if r and r.get("greeting_wait_ms"):
                g, c = r["greeting_wait_ms"], r["latency_from_connect_ms"]
                p(f"  {s}: probes' wait for the 220 greeting p50 {num(g['p50'], '{:.1f}')} ms, "
                  f"p99 {num(g['p99'], '{:.1f}')} ms; latency counted from the connection "
                  f"p50 {num(c['p50'], '{:.1f}')} ms, p99 {num(c['p99'], '{:.1f}')} ms")
        p("")

    p("== against the targets of issue 5 (ratios within each round; their median counts) ==")

    def within(num_of, den_of):
        """The ratio in each round that has both figures, and their median."""
        each = [ratio(num_of(one), den_of(one)) for one in rounds]
        each = [r for r in each if r is not None]
        return median(each), each

    def fig(setup, rc, key, sub=None):
        def get(one):
            r = one.get((setup, rc))
            if r is None:
                return None
            return r[key] if sub is None else r[key][sub]
        return get

    def line(label, value_each, fmt, target, ok):
        value, each = value_each
        rounds_txt = ""
        if len(each) > 1:
            met = sum(1 for r in each if ok(r))
            rounds_txt = (f"  [rounds: {', '.join(fmt.format(r) for r in each)}; "
                          f"met in {met} of {len(each)}]")
        p(f"{label} = {num(value, fmt)}  ({target})  "
          f"{verdict(None if value is None else ok(value))}{rounds_txt}")

    line("1 rcpt:  optgate/postfix delivered msgs/s",
         within(fig("optgate", 1, "delivered_copies_per_s"), fig("postfix", 1, "delivered_copies_per_s")),
         "{:.2f}", "target >= 2", lambda r: r >= 2)
    line("1 rcpt:  optgate/direct",
         within(fig("optgate", 1, "delivered_copies_per_s"), fig("direct", 1, "accepted_msgs_per_s")),
         "{:.0%}", "target >= 40%", lambda r: r >= 0.4)
    plain, _ = within(fig("optgate", 1, "delivered_copies_per_s"),
                      fig("direct-plain", 1, "accepted_msgs_per_s"))
    if plain is not None:
        p(f"         against the limit with a plain smtp-sink (no -v): {plain:.0%}")
    og1, direct1 = cases.get(("optgate", 1)), cases.get(("direct", 1))
    if signing and og1 and direct1:
        # The most the cores could carry if optgate did nothing but sign each message
        # and take it in as cheaply as the sink does, with the sink and the client
        # costing what they cost beside optgate: whatever optgate gets is below this.
        receive = cpu_per_copy(direct1, "sink")
        peers = cpu_per_copy(og1, "sink") + cpu_per_copy(og1, "client")
        ceiling = os.cpu_count() / (signing + receive + peers)
        rate = og1["delivered_copies_per_s"]
        p(f"         ceiling: {ceiling:.0f} msgs/s = {ceiling / direct1['accepted_msgs_per_s']:.0%} of the limit "
          f"(optgate reached {rate / ceiling:.0%} of it), were optgate to do nothing but one DKIM")
        p(f"         signature ({signing * 1e3:.2f} ms alone) and take the message in as cheaply as the sink "
          f"({receive * 1e3:.2f} ms in the limit's case):")
        p(f"         {os.cpu_count()} cores / ({signing * 1e3:.2f} + {receive * 1e3:.2f} + {peers * 1e3:.2f} ms, "
          f"what the sink and the client spend per copy beside optgate)")
    line("10 rcpt: optgate copies/s / postfix msgs/s",
         within(fig("optgate", 10, "delivered_copies_per_s"), fig("postfix", 10, "delivered_copies_per_s")),
         "{:.2f}", "target >= 3", lambda r: r >= 3)
    og10 = cases.get(("optgate", 10))
    if og10:
        cores = og10["cores"].get("optgate")
        per_core = ratio(og10["delivered_copies_per_s"], cores)
        p(f"10 rcpt: optgate {num(og10['delivered_copies_per_s'])} copies/s on "
          f"{num(cores, '{:.2f}')} cores = {num(per_core)} copies/s per busy core"
          + (f" (one DKIM signature alone takes {signing * 1e3:.2f} ms: at most "
             f"{1 / signing:.0f} copies/s per core)" if signing else ""))
    for rc in (1, 10):
        if ("optgate", rc) not in cases or ("postfix", rc) not in cases:
            continue
        line(f"{rc} rcpt{'s' if rc > 1 else ''}: latency p99 optgate/postfix",
             within(fig("optgate", rc, "latency_ms", "p99"), fig("postfix", rc, "latency_ms", "p99")),
             "{:.2f}", "target <= 0.25", lambda r: r <= 0.25)
        p50s = [one[("optgate", rc)]["latency_ms"]["p50"] for one in rounds if ("optgate", rc) in one]
        line(f"{rc} rcpt{'s' if rc > 1 else ''}: optgate latency p50 (ms)",
             (median(p50s), [v for v in p50s if v is not None]),
             "{:.1f}", "target < 50 ms", lambda v: v < 50)
    peaks = [r["rss"]["peak_mb"] for k, r in cases.items() if k[0] == "optgate" and r.get("rss")]
    if peaks:
        p(f"peak RSS of optgate during the load: {max(peaks):.1f} MB  (target < 150 MB)  "
          f"{verdict(max(peaks) < 150)}")
    if "idle" in memory:
        m = memory["idle"]
        p(f"{m['connections']} idle connections: +{m['delta_mb']:.1f} MB "
          f"({m['rss_before_mb']:.1f} -> {m['rss_with_idle_mb']:.1f} MB, {m['refused']} not greeted)"
          f"  (target < 50 MB)  {verdict(m['delta_mb'] < 50 and m['refused'] == 0)}")
    if "big" in memory:
        m = memory["big"]
        p(f"one {m['size_mb']:.1f} MB message: peak RSS {m['peak_rss_mb']:.1f} MB = "
          f"{m['peak_over_size']:.2f}x its size, {m['reply'][:40]!r}, "
          f"{'delivered in %.1f s' % m['delivered_s'] if m['delivered_s'] else 'NOT delivered'}"
          f"  (target < 4x)  {verdict(m['peak_over_size'] < 4 and m['delivered_s'] is not None)}")
    compared = sorted({k[1] for k in cases if k[0] == "optgate-b"})
    if compared:
        p("")
        p("== optgate-b (BENCH_COMPARE) against optgate: ratios within each round, their median ==")
    for rc in compared:
        for label, (value, each) in (
                ("delivered copies/s", within(fig("optgate-b", rc, "delivered_copies_per_s"),
                                              fig("optgate", rc, "delivered_copies_per_s"))),
                ("CPU per copy", within(lambda one: cpu_per_copy(one.get(("optgate-b", rc))),
                                        lambda one: cpu_per_copy(one.get(("optgate", rc)))))):
            above = sum(1 for r in each if r > 1)
            p(f"{rc} rcpt: optgate-b/optgate {label} = {num(value, '{:.3f}')}  "
              f"[rounds: {', '.join(f'{r:.3f}' for r in each)}; above 1 in {above} of {len(each)}]")
    print("\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
