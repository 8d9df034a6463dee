#!/usr/bin/env python3
"""The load-benchmark issue's targets, read off one `scripts/bench.sh` run's files.

usage: bench_summary.py OUT_DIR STARTED_FILE

Only files written since STARTED_FILE was touched count, so an older run's results left in
OUT_DIR are never mixed into this one's ratios. Prints one line per target and backend with the
figures it is computed from, and "met" / "missed" / "not run".
"""

import json
import os
import re
import sys


def main():
    out, started = sys.argv[1], os.path.getmtime(sys.argv[2])

    def fresh(name):
        path = os.path.join(out, name)
        return path if os.path.exists(path) and os.path.getmtime(path) >= started else None

    def report(name):
        path = fresh(name)
        if path is None:
            return None
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as error:
            print(f"{name}: unreadable ({error}); left out")
            return None

    def number_before(name, unit):
        path = fresh(name)
        if path is None:
            return None
        with open(path) as f:
            found = re.search(r"([0-9.]+) " + re.escape(unit), f.read())
        return float(found.group(1)) if found else None

    def pgbench(clients):
        path = fresh(f"pgbench-{clients}.txt")
        if path is None:
            return None
        with open(path) as f:
            found = re.search(r"tps = ([0-9.]+)", f.read())
        return float(found.group(1)) if found else None

    def of(part, whole):
        """part / whole, or 0.0 when whole is 0 (nothing answered OK)."""
        return part / whole if whole else 0.0

    def books(r):
        """The run's audit of the hot accounts, as a phrase, and whether it passed."""
        audit = r.get("audit")
        if audit is None:
            return "not audited", False
        sound = audit["negative"] == 0 and audit["mismatched"] == 0 and audit["unresolved"] == 0
        return (
            f"audit of {audit['accounts']:,} hot accounts: {audit['settlements']:,} settlements, "
            f"{audit['negative']} negative, {audit['mismatched']} not matching what was drawn, "
            f"{audit['unresolved']} unresolved", sound)

    def verdict(ok):
        return "met" if ok else "missed"

    def errors(r):
        return ", ".join(f"{reason}={n}" for reason, n in sorted(r["errors"].items())) or "no error"

    def machine(r):
        if r.get("machine_busy_percent") is None:
            return ""
        stolen = r.get("machine_stolen_percent")
        return f", machine {r['machine_busy_percent']:.0f}% busy" + (f", {stolen:.0f}% stolen" if stolen is not None else "")

    def cpu(r, a):
        if r.get("cpu_ms_per_ok") is None or a.get("cpu_ms_per_ok") is None:
            return ""
        return f", machine CPU per settlement {r['cpu_ms_per_ok']:.3f} ms against (a)'s {a['cpu_ms_per_ok']:.3f}"

    argon2 = number_before("argon2.txt", "verifications/s")
    lines = []
    for backend in ("embedded", "postgres-redis"):
        a = report(f"{backend}-a.json")
        if a is None:
            lines.append(f"{backend}: scenario (a) not run; no ratio")
            continue
        lines.append(
            f"{backend} (a) at {a['offered_rate']:,.0f}/s offered: {a['achieved_rate']:,.0f}/s, {errors(a)}, "
            f"p50 {a['p50_ms']:.2f} ms, p99 {a['p99_ms']:.2f} ms{machine(a)} (targets at 3,500/s: p50 <= 2, p99 <= 10): "
            + (verdict(a["p50_ms"] <= 2 and a["p99_ms"] <= 10 and not a["errors"])
               if a["offered_rate"] == 3500 else "not run at 3,500/s")
        )
        for scenario, r in (("a", a), ("b", report(f"{backend}-b.json"))):
            if r is not None and r.get("audit") is not None:
                phrase, sound = books(r)
                lines.append(f"{backend} ({scenario}) books: {phrase}: {'sound' if sound else 'FAILED'}")
        # The throughput target: the highest rate achieved with no error, in (a) or any step of (e).
        def clean_rate(r):
            """The rate, if the run had no error and its books (when audited) balanced."""
            return [r["achieved_rate"]] if not r["errors"] and (r.get("audit") is None or books(r)[1]) else []

        clean = clean_rate(a)
        e = report(f"{backend}-e.json")
        if e is not None:
            clean += [rate for step in e["steps"] for rate in clean_rate(step)]
            best = e["highest_rate_meeting_target"]
            lines.append(
                f"{backend} (e) highest offered rate with p99 <= {e['p99_target_ms']:g} ms and no error: "
                + (f"{best:,.0f}/s" if best else "none")
            )
        lines.append(
            f"{backend} (a) highest rate achieved with no error, in (a) and (e): {max(clean, default=0):,.0f}/s "
            f"(target >= 5,000/s): {verdict(max(clean, default=0) >= 5000)}"
        )
        c = report(f"{backend}-c.json")
        if c is not None and argon2:
            share = of(c["achieved_rate"], argon2)
            lines.append(
                f"{backend} (c) card + PIN: {c['achieved_rate']:,.1f}/s = {share:.0%} of argon2's "
                f"{argon2:,.1f}/s (target >= 80%): {verdict(share >= 0.8)}"
            )
        d = report(f"{backend}-d.json")
        if d is not None:
            share = of(d["achieved_rate"], a["achieved_rate"])
            phrase, sound = books(d)
            lines.append(
                f"{backend} (d) hot accounts: {d['achieved_rate']:,.0f}/s = {share:.0%} of (a), {errors(d)}; "
                f"{phrase} (target >= 50%, never negative): {verdict(share >= 0.5 and sound)}"
            )
        f = report(f"{backend}-f.json")
        if f is not None:
            share = of(f["achieved_rate"], a["achieved_rate"])
            lines.append(
                f"{backend} (f) 10M-account population: {f['achieved_rate']:,.0f}/s = {share:.1%} of (a), "
                f"{errors(f)}{cpu(f, a)} (target >= 90%): {verdict(share >= 0.9)}"
            )
        if backend == "postgres-redis":
            for clients in (16, 1):
                tps = pgbench(clients)
                if tps:
                    ratio = of(a["achieved_rate"], tps)
                    target = f"(target >= 2x): {verdict(ratio >= 2)}" if clients == 16 else "(context: one connection, as the committer)"
                    lines.append(
                        f"{backend} group commit: (a) {a['achieved_rate']:,.0f}/s / pgbench one-row commits at "
                        f"{clients} client{'s' if clients > 1 else ''} {tps:,.0f} tps = {ratio:.2f}x {target}"
                    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
