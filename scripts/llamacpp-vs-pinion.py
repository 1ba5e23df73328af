#!/usr/bin/env python3
"""Token generation speed of llama.cpp and pinion side by side, under a memory limit, from a cold page cache.

    scripts/llamacpp-vs-pinion.py --llama-bench PATH --gguf FILE --limit SIZE|none [--extra 36MiB]
        [--pinion-cmd "pinion bench ... --output-format json"] [--drop-cache FILE]...
        [-n 32] [-t 2] [--repetitions 2] [--timeout SECONDS] [--llama-args "--repack 0"] [--save FILE.json]

What it measures, and why:

pinion's claim is speed on models larger than the memory they are given. The fair opponent is llama.cpp with
its default mmap loading: given less memory than the model, the kernel pages weights in from the file on
demand and evicts them again under pressure. Each run goes through scripts/under-limit.py, which

* empties the page cache of the model files first (so both tools really read from disk, instead of one of them
  finding the model already in memory from the previous run), and
* runs the tool in a fresh cgroup v1 memory group. That group charges page cache as well as anonymous memory,
  so llama.cpp's mmap'd weights compete with its own working set (KV cache, compute buffers): at a limit below
  the model size, every token faults in weights that evict other weights (major faults, refaults).

llama-bench runs as `-p 0 -n N -t T -r 1 -o json` (mmap is its default load mode; note that llama.cpp's CPU
"repack" of Q4_0/Q4_K/Q8_0 weights copies them into anonymous memory, bypassing mmap; `--llama-args
"--repack 0"` turns that off). Its limit is --limit plus --extra: an allowance for llama.cpp's own compute
buffers and KV cache, on top of the budget for weights. pinion's command runs under the plain --limit and must
print a JSON object with `tokens_per_s` (the last JSON object in its stdout is used; `pinion bench
--output-format json` does this). The files evicted before pinion's runs are the --drop-cache files (by
default the --gguf file).

The two tools alternate --repetitions times (llama.cpp, pinion, llama.cpp, pinion, ...) so that slow drift of
the machine (another build, thermal state) hits both alike. The result is a markdown table: tokens/s median
(and each run), peak RSS, major faults, bytes read from disk (GNU time's file system inputs, which include
readahead), the cgroup's peak usage (page cache included) and its file refaults, and the ratio of the medians,
followed by the load average before each run. Failed runs (OOM kill, timeout, non-zero exit) are counted and
shown, not hidden. How much a major fault on the mmap'd model reads is set by the disk's read-ahead
(/sys/block/DEV/queue/read_ahead_kb; 8 MiB on the machine this was written on), so under a tight limit
"read from disk" can exceed the model size per token: read-around brings in pages that are evicted unused.

Python 3 standard library only; needs root for the cgroup (see under-limit.py).
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
UNDER_LIMIT = os.path.join(HERE, "under-limit.py")


def parse_size_or_none(text):
    if text.lower() in ("none", "0", "off"):
        return None
    # under-limit.py's parser (importing a file with a dash in its name needs importlib)
    import importlib.util
    spec = importlib.util.spec_from_file_location("under_limit", UNDER_LIMIT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.parse_size(text)


def mib(n):
    return "-" if n is None else f"{n / (1 << 20):.1f} MiB"


def last_json_object(text):
    """The last top-level JSON value in text that is an object (or an array holding objects)."""
    decoder = json.JSONDecoder()
    found = None
    i = 0
    while True:
        starts = [j for j in (text.find("{", i), text.find("[", i)) if j >= 0]
        if not starts:
            return found
        i = min(starts)
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        if isinstance(value, (dict, list)):
            found = value
        i = end


def under_limit(label, cmd, limit, drop, timeout):
    """Run cmd through under-limit.py; return its report (dict), with a one-line summary on stderr."""
    argv = [sys.executable, UNDER_LIMIT, "--label", label, "--tail-chars", "200000"]
    if limit is not None:
        argv += ["--limit", str(limit)]
    for f in drop:
        argv += ["--drop-cache", f]
    if timeout:
        argv += ["--timeout", str(timeout)]
    argv += ["--"] + cmd
    print(f"[run] {label}: {shlex.join(argv)}", file=sys.stderr, flush=True)
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[0]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        sys.exit(f"llamacpp-vs-pinion: under-limit.py failed (status {proc.returncode}): {proc.stderr.strip()}")
    report["loadavg_before"] = load_before
    return report


def llama_tokens_per_s(report):
    results = last_json_object(report["stdout"])
    if isinstance(results, list) and results and "avg_ts" in results[-1]:
        return float(results[-1]["avg_ts"])
    return None


def pinion_tokens_per_s(report):
    obj = last_json_object(report["stdout"])
    if isinstance(obj, dict) and "tokens_per_s" in obj:
        return float(obj["tokens_per_s"])
    return None


def describe_failure(report):
    if report.get("oom_killed"):
        return "OOM-killed"
    if report.get("timed_out"):
        return "timed out"
    if report.get("exit_code"):
        return f"exit {report['exit_code']}"
    return "no tokens/s in output"


def summary_row(tool, limit, runs):
    speeds = [r["tokens_per_s"] for r in runs if r["tokens_per_s"] is not None]
    failures = [describe_failure(r) for r in runs if r["tokens_per_s"] is None]
    median = statistics.median(speeds) if speeds else None

    def worst(key):
        values = [r.get(key) for r in runs if r.get(key) is not None]
        return max(values) if values else None

    def middle(key):
        values = [r.get(key) for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    each = ", ".join(f"{s:.2f}" for s in speeds) + ("; " if speeds and failures else "") + ", ".join(failures)
    faults = middle("major_faults")
    disk = middle("fs_inputs_512b")
    refaults = worst("cgroup_refaults_file")
    row = [tool, mib(limit) if limit is not None else "none",
           f"**{median:.2f}**" if median is not None else "-", each,
           mib(worst("peak_rss_bytes")), "-" if faults is None else f"{faults:.0f}",
           "-" if disk is None else mib(disk * 512),
           mib(worst("cgroup_max_usage_bytes")), "-" if refaults is None else str(refaults),
           f"{statistics.median(r['wall_s'] for r in runs if r.get('wall_s') is not None):.1f}"
           if any(r.get("wall_s") is not None for r in runs) else "-"]
    return row, median


def main():
    p = argparse.ArgumentParser(description="llama-bench vs pinion tokens/s under a cgroup memory limit, "
                                            "cold page cache, interleaved.")
    p.add_argument("--llama-bench", required=True, metavar="PATH")
    p.add_argument("--gguf", required=True, metavar="FILE")
    p.add_argument("--limit", required=True, type=parse_size_or_none, help="e.g. 49181216, 85MiB, or none")
    p.add_argument("--extra", default="36MiB", type=parse_size_or_none,
                   help="added to llama.cpp's limit for its buffers (default 36MiB)")
    p.add_argument("--pinion-cmd", default=None, help="shell-quoted command printing JSON with tokens_per_s")
    p.add_argument("--drop-cache", action="append", default=[], metavar="FILE",
                   help="files evicted before each pinion run (default: --gguf)")
    p.add_argument("-n", type=int, default=32, help="tokens to generate (llama-bench -n)")
    p.add_argument("-t", type=int, default=2, help="threads (llama-bench -t)")
    p.add_argument("--repetitions", type=int, default=2)
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="per run")
    p.add_argument("--llama-args", default="", help="extra llama-bench arguments, e.g. \"--repack 0\"")
    p.add_argument("--save", default=None, metavar="FILE", help="write every run's full report here (JSON)")
    args = p.parse_args()

    for path in (args.llama_bench, args.gguf):
        if not os.path.exists(path):
            sys.exit(f"llamacpp-vs-pinion: {path}: no such file")
    llama_limit = None if args.limit is None else args.limit + (args.extra or 0)
    llama_cmd = [args.llama_bench, "-m", args.gguf, "-p", "0", "-n", str(args.n), "-t", str(args.t),
                 "-r", "1", "-o", "json"] + shlex.split(args.llama_args)
    pinion_cmd = shlex.split(args.pinion_cmd) if args.pinion_cmd else None
    pinion_drop = args.drop_cache or [args.gguf]

    runs = {"llama.cpp": [], "pinion": []}
    for rep in range(args.repetitions):
        r = under_limit(f"llama.cpp#{rep + 1}", llama_cmd, llama_limit, [args.gguf], args.timeout)
        r["tokens_per_s"] = llama_tokens_per_s(r)
        runs["llama.cpp"].append(r)
        print(f"[res] llama.cpp#{rep + 1}: {r['tokens_per_s']} t/s, rss {mib(r.get('peak_rss_bytes'))}, "
              f"majflt {r.get('major_faults')}, cgroup max {mib(r.get('cgroup_max_usage_bytes'))}, "
              f"wall {r.get('wall_s')} s, load before {r['loadavg_before']}", file=sys.stderr, flush=True)
        if pinion_cmd:
            r = under_limit(f"pinion#{rep + 1}", pinion_cmd, args.limit, pinion_drop, args.timeout)
            r["tokens_per_s"] = pinion_tokens_per_s(r)
            runs["pinion"].append(r)
            print(f"[res] pinion#{rep + 1}: {r['tokens_per_s']} t/s, rss {mib(r.get('peak_rss_bytes'))}, "
                  f"majflt {r.get('major_faults')}, cgroup max {mib(r.get('cgroup_max_usage_bytes'))}, "
                  f"wall {r.get('wall_s')} s, load before {r['loadavg_before']}", file=sys.stderr, flush=True)

    if args.save:
        with open(args.save, "w") as f:
            json.dump({"args": vars(args), "llama_cmd": llama_cmd, "pinion_cmd": pinion_cmd, "runs": runs}, f,
                      indent=1)

    header = ["tool", "limit", "tokens/s (median)", "each run", "peak RSS (max)", "major faults (median)",
              "read from disk (median)", "cgroup max usage", "file refaults (max)", "wall s (median)"]
    rows = []
    medians = {}
    row, medians["llama.cpp"] = summary_row("llama.cpp (llama-bench tg%d)" % args.n, llama_limit,
                                            runs["llama.cpp"])
    rows.append(row)
    if pinion_cmd:
        row, medians["pinion"] = summary_row("pinion", args.limit, runs["pinion"])
        rows.append(row)
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    loads = [(name, r["loadavg_before"]) for i in range(args.repetitions) for name in runs if i < len(runs[name])
             for r in [runs[name][i]]]
    print("\n1-minute load average before each run (the previous run's own load decays into it): "
          + ", ".join(f"{name} {load}" for name, load in loads))
    if pinion_cmd:
        if medians["llama.cpp"] and medians["pinion"]:
            print(f"\npinion / llama.cpp (ratio of medians): **{medians['pinion'] / medians['llama.cpp']:.2f}x**")
        else:
            print("\npinion / llama.cpp: n/a (a tool has no successful run)")
    failed = any(r["tokens_per_s"] is None for rs in runs.values() for r in rs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
