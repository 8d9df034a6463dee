#!/usr/bin/env python3
"""CPU time and context switches of one process over a window, per thread name.

    scripts/thread_cpu.py PID SECONDS [--after FILE]

Reads /proc/PID/task/*/{comm,stat,status} at the start and the end of the window and prints, per
thread name (threads of the same name added up), the CPU seconds used and the voluntary and
involuntary context switches. With --after, the window starts 3 s after FILE (a load generator's
stderr) shows its set-up finished (`PINs: N/N`), so that the set-up's calls are not counted (the
run must last at least 13 s more).
How BENCHMARKS.md splits the embedded gateway's CPU between its threads. (Threads are told apart by
name only: tokio's blocking-pool threads share its workers' name.) A thread that ends within the
window is missing from the per-name lines; the last line, the whole process's CPU from
/proc/PID/stat, still counts it.
"""
import os
import re
import sys
import time


def stat_ticks(path):
    """User + system CPU in clock ticks from a /proc stat file (after the name, which may hold spaces)."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def process_ticks(pid):
    """The whole process's CPU, threads that ended included."""
    try:
        return stat_ticks(f"/proc/{pid}/stat")
    except OSError:
        sys.exit(f"process {pid} is gone")


def snapshot(pid):
    threads = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        sys.exit(f"process {pid} is gone")
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
            ticks = stat_ticks(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue  # the thread ended meanwhile
        voluntary = int(status["voluntary_ctxt_switches"])
        involuntary = int(status["nonvoluntary_ctxt_switches"])
        threads[tid] = (name, ticks, voluntary, involuntary)
    return threads


def main():
    args = sys.argv[1:]
    after = None
    if "--after" in args:
        at = args.index("--after")
        after = args[at + 1]
        del args[at : at + 2]
    if len(args) != 2:
        sys.exit(__doc__)
    pid, seconds = args[0], float(args[1])
    if after:
        done = re.compile(r"PINs: (\d+)/\1(?!\d)")
        while not (os.path.exists(after) and done.search(open(after, errors="replace").read())):
            if not os.path.exists(f"/proc/{pid}"):
                sys.exit(f"process {pid} ended before {after} showed the set-up finished")
            time.sleep(0.2)
        time.sleep(3)
    started = time.monotonic()
    before, process_before = snapshot(pid), process_ticks(pid)
    time.sleep(seconds)
    end, process_end = snapshot(pid), process_ticks(pid)
    seconds = time.monotonic() - started
    tick = os.sysconf("SC_CLK_TCK")
    totals = {}
    for tid, (name, ticks, voluntary, involuntary) in end.items():
        _, ticks0, voluntary0, involuntary0 = before.get(tid, (name, 0, 0, 0))
        total = totals.setdefault(name, [0, 0, 0, 0])
        total[0] += 1
        total[1] += ticks - ticks0
        total[2] += voluntary - voluntary0
        total[3] += involuntary - involuntary0
    print(f"over {seconds:.2f} s:")
    for name, (count, ticks, voluntary, involuntary) in sorted(totals.items(), key=lambda t: -t[1][1]):
        print(f"  {name:18s} {count:3d} threads  cpu {ticks / tick:6.2f} s  "
              f"switches: voluntary {voluntary:7d}, involuntary {involuntary:6d}")
    print(f"  {'all':18s} {len(end):3d} threads  cpu {sum(t[1] for t in totals.values()) / tick:6.2f} s")
    print(f"  {'the process':18s}              cpu {(process_end - process_before) / tick:6.2f} s  (threads that ended included)")


if __name__ == "__main__":
    main()
