#!/usr/bin/env python3
"""Run one command under a memory limit, from a cold page cache, and report what happened as JSON.

    scripts/under-limit.py [--limit SIZE] [--drop-cache FILE]... [--label NAME]
                           [--timeout SECONDS] [--tail-chars N] [--cgroup-parent DIR] -- CMD ARGS...

What it measures, and why it is set up this way:

* The point is to compare inference engines on a model that does not fit in the memory they are given
  (pinion's whole reason to exist). A memory limit is only meaningful if the model has to come from disk, so
  each `--drop-cache FILE` is evicted from the page cache first (posix_fadvise DONTNEED); the pages of it that
  were resident before and after are counted with mincore(2). Pages still mapped by some other process cannot
  be evicted; "resident_pages_after" shows it when that happens.

* The limit is a cgroup v1 memory group (memory.limit_in_bytes, and memory.memsw.limit_in_bytes so swap cannot
  stand in for RAM). A v1 memory cgroup charges the page cache that its processes bring in, not just their
  anonymous memory. So a program that mmaps its model (llama.cpp's default) competes with itself: every page
  of weights it faults in counts against the same limit as its KV cache and scratch buffers, and under
  pressure the kernel reclaims weight pages that the next token needs again (re-read from disk: major faults).
  A program that reads the model with O_DIRECT brings nothing into the page cache and is charged only for its
  own buffers. Pages that were already cached before the run (charged to some other group) would not be
  charged at all, which is a second reason to empty the cache first.

* The group is made fresh for each run (pinion-<pid>), by default inside the memory cgroup this script itself
  runs in, so the command stays inside whatever accounting and limits already apply to the caller; the
  command's pid is written into it between fork and exec. Afterwards memory.max_usage_in_bytes (peak charge,
  page cache included), memory.failcnt (times a charge failed at the limit; note that the 6.18 kernel of the
  machine this was written on leaves it at 0 even when usage sits at the limit), the oom_kill count of
  memory.oom_control and workingset_refault_file of memory.stat (file pages read again after the group's own
  reclaim evicted them: the thrashing count) are read, and the group is removed, also on errors, timeouts and
  Ctrl-C.

* The command runs under GNU `/usr/bin/time -v` for peak RSS (which counts mapped file pages while they are
  resident), wall time, major page faults and file system inputs (512-byte units).

Output: one JSON object on stdout (label, cmd, limit_bytes, exit_code, wall_s, peak_rss_bytes, major_faults,
fs_inputs_512b, cgroup_max_usage_bytes, cgroup_failcnt, cgroup_refaults_file, oom_killed, timed_out, drop_cache,
stdout and stderr tails). The exit status is non-zero when the command failed, was OOM-killed or timed out.

Needs root (for the cgroup and, on some systems, fadvise on other users' files) and the cgroup v1 memory
controller at /sys/fs/cgroup/memory. Python 3 standard library only.
"""

import argparse
import ctypes
import ctypes.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

CGROUP_V1_MEMORY = "/sys/fs/cgroup/memory"
GNU_TIME = "/usr/bin/time"
TAIL_CHARS = 4000


class Fail(Exception):
    """An error to print as one line, without a traceback."""


# ---------------------------------------------------------------------------------------------------------------
# sizes


_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1000, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1000 ** 2, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1000 ** 4, "tib": 1 << 40,
}


def parse_size(text):
    """'85MiB' -> 89128960; '100MB' -> 100000000; '1.5G' -> 1610612736; '49181216' -> 49181216."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 89128960, 85MiB, 100MB, 1.5GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


# ---------------------------------------------------------------------------------------------------------------
# page cache


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_pages(fd, size):
    """How many pages of the open file are in the page cache (mincore over a mapping that is never touched)."""
    if size == 0:
        return 0
    import mmap
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        return None
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = ctypes.create_string_buffer(pages)
        if _libc.mincore(addr, size, vec) != 0:
            return None
        return sum(b & 1 for b in vec.raw)
    finally:
        _libc.munmap(addr, size)


def drop_cache(path):
    """Evict one file from the page cache; return its size and resident pages before and after."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise Fail(f"--drop-cache {path}: {e.strerror}")
    try:
        size = os.fstat(fd).st_size
        before = resident_pages(fd, size)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        after = resident_pages(fd, size)
    finally:
        os.close(fd)
    return {"file": path, "size_bytes": size, "page_size": os.sysconf("SC_PAGE_SIZE"),
            "resident_pages_before": before, "resident_pages_after": after}


# ---------------------------------------------------------------------------------------------------------------
# cgroup v1 memory group


def own_memory_cgroup():
    """The memory cgroup (v1) this process is in, as a directory under /sys/fs/cgroup/memory."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    return os.path.join(CGROUP_V1_MEMORY, path.lstrip("/"))
    except OSError:
        pass
    return CGROUP_V1_MEMORY


def read_text(path):
    with open(path) as f:
        return f.read()


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


class MemoryGroup:
    """A fresh cgroup v1 memory group with a hard limit (RAM, and RAM+swap when the kernel has memsw)."""

    def __init__(self, parent, limit):
        if os.geteuid() != 0:
            raise Fail("--limit needs root (to create a cgroup under /sys/fs/cgroup/memory); run with sudo")
        if not os.path.exists(os.path.join(CGROUP_V1_MEMORY, "memory.limit_in_bytes")):
            raise Fail(f"no cgroup v1 memory controller at {CGROUP_V1_MEMORY} (memory.limit_in_bytes missing); "
                       "this script needs cgroup v1 (or a hybrid hierarchy with memory on v1)")
        if not os.path.isdir(parent):
            raise Fail(f"cgroup parent {parent} does not exist")
        self.path = os.path.join(parent, f"pinion-{os.getpid()}")
        try:
            os.mkdir(self.path)
        except OSError as e:
            raise Fail(f"cannot create cgroup {self.path}: {e.strerror}")
        try:
            # memsw (RAM + swap) may never be below limit_in_bytes: lower the RAM limit first.
            memsw = os.path.join(self.path, "memory.memsw.limit_in_bytes")
            write_text(os.path.join(self.path, "memory.limit_in_bytes"), str(limit))
            if os.path.exists(memsw):
                write_text(memsw, str(limit))
            self.limit = int(read_text(os.path.join(self.path, "memory.limit_in_bytes")))
        except OSError as e:
            self.remove()
            raise Fail(f"cannot set the limit on {self.path}: {e.strerror}")

    def enter(self):
        """Move the calling process into the group (called in the child between fork and exec)."""
        write_text(os.path.join(self.path, "cgroup.procs"), str(os.getpid()))

    def stats(self):
        out = {"cgroup": self.path, "cgroup_limit_bytes": self.limit}
        out["cgroup_max_usage_bytes"] = int(read_text(os.path.join(self.path, "memory.max_usage_in_bytes")))
        out["cgroup_failcnt"] = int(read_text(os.path.join(self.path, "memory.failcnt")))
        memsw_failcnt = os.path.join(self.path, "memory.memsw.failcnt")
        if os.path.exists(memsw_failcnt):
            out["cgroup_memsw_failcnt"] = int(read_text(memsw_failcnt))
        oom = dict(line.split() for line in read_text(os.path.join(self.path, "memory.oom_control")).splitlines())
        out["cgroup_oom_kills"] = int(oom.get("oom_kill", 0))
        stat = dict(line.split() for line in read_text(os.path.join(self.path, "memory.stat")).splitlines())
        out["cgroup_cache_after_bytes"] = int(stat.get("total_cache", stat.get("cache", 0)))
        # file pages read again after the group's own reclaim evicted them: the thrashing count
        out["cgroup_refaults_file"] = int(stat.get("total_workingset_refault_file", 0))
        return out

    def pids(self):
        try:
            return [int(p) for p in read_text(os.path.join(self.path, "cgroup.procs")).split()]
        except OSError:
            return []

    def remove(self):
        """rmdir the group; anything still in it was started by us, so it is killed first."""
        for _ in range(50):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        print(f"under-limit: warning: could not remove cgroup {self.path}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# /usr/bin/time -v


def parse_time_v(text):
    """The fields we use from GNU time's -v report."""
    def field(name):
        m = re.search(r"^\s*" + re.escape(name) + r".*?:\s*(\S+)\s*$", text, re.M)
        return m.group(1) if m else None

    out = {}
    wall = field("Elapsed (wall clock) time")
    if wall is not None:
        secs = 0.0
        for part in wall.split(":"):  # h:mm:ss or m:ss.ss
            secs = secs * 60 + float(part)
        out["wall_s"] = round(secs, 3)
    rss = field("Maximum resident set size (kbytes)")
    out["peak_rss_bytes"] = int(rss) * 1024 if rss is not None else None
    majflt = field("Major (requiring I/O) page faults")
    out["major_faults"] = int(majflt) if majflt is not None else None
    inputs = field("File system inputs")
    out["fs_inputs_512b"] = int(inputs) if inputs is not None else None
    m = re.search(r"^Command terminated by signal (\d+)", text, re.M)
    out["signal"] = int(m.group(1)) if m else None
    status = field("Exit status")
    out["time_exit_status"] = int(status) if status is not None else None
    return out


# ---------------------------------------------------------------------------------------------------------------


def children(pid):
    """Direct children of a process (from /proc/PID/task/*/children)."""
    pids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return pids


def stop(child):
    """Stop the command so that GNU time still writes its report: SIGINT to the process group (time ignores
    SIGINT while it waits), then SIGTERM to time's child, then SIGKILL to the whole group."""
    steps = [(lambda: os.killpg(child.pid, signal.SIGINT), 5),
             (lambda: [os.kill(pid, signal.SIGTERM) for pid in children(child.pid)], 5),
             (lambda: os.killpg(child.pid, signal.SIGKILL), None)]
    for send, grace in steps:
        try:
            send()
        except ProcessLookupError:
            pass
        try:
            return child.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


def run(args):
    if not os.access(GNU_TIME, os.X_OK):
        raise Fail(f"{GNU_TIME} is missing; install GNU time first (Debian: apt-get install -y time)")
    for path in args.drop_cache:
        if not os.path.isfile(path):
            raise Fail(f"--drop-cache {path}: no such file")

    report = {"label": args.label, "cmd": args.cmd, "limit_bytes": args.limit}
    group = MemoryGroup(args.cgroup_parent or own_memory_cgroup(), args.limit) if args.limit else None
    time_report = tempfile.NamedTemporaryFile(prefix="under-limit-time-", suffix=".txt", delete=False)
    time_report.close()
    timed_out = interrupted = False
    started = time.monotonic()
    try:
        report["drop_cache"] = [drop_cache(p) for p in args.drop_cache]
        try:
            # own session: on timeout or Ctrl-C we signal the command's process group (GNU time ignores
            # SIGINT while it waits, so it still writes its report after the command stops).
            child = subprocess.Popen([GNU_TIME, "-v", "-o", time_report.name, "--"] + args.cmd,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=group.enter if group else None, start_new_session=True)
        except (OSError, subprocess.SubprocessError) as e:
            raise Fail(f"cannot start {args.cmd[0]}: {e}")
        try:
            out, err = child.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        except KeyboardInterrupt:
            interrupted = True
        if timed_out or interrupted:
            out, err = stop(child)
        report["exit_code"] = child.returncode
        report["harness_wall_s"] = round(time.monotonic() - started, 3)
        report.update(parse_time_v(read_text(time_report.name)))
        if group:
            report.update(group.stats())
    finally:
        if group:
            group.remove()
        os.unlink(time_report.name)

    report["oom_killed"] = bool(report.get("cgroup_oom_kills"))
    report["timed_out"] = timed_out
    report["interrupted"] = interrupted
    report["stdout"] = out.decode("utf-8", "replace")[-args.tail_chars:]
    report["stderr"] = err.decode("utf-8", "replace")[-args.tail_chars:]
    return report


def main():
    p = argparse.ArgumentParser(
        description="Run a command under a cgroup v1 memory limit with files evicted from the page cache; "
                    "print a JSON report.",
        usage="%(prog)s [--limit SIZE] [--drop-cache FILE]... [--label NAME] [--timeout S] -- CMD ARGS...")
    p.add_argument("--limit", type=parse_size, help="memory limit (bytes, or 85MiB, 100MB, 1.5GiB); none if absent")
    p.add_argument("--drop-cache", action="append", default=[], metavar="FILE",
                   help="evict FILE from the page cache before the run (repeatable)")
    p.add_argument("--label", default=None, help="a name copied into the report")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop the command after this long (SIGINT, SIGTERM 5 s later, SIGKILL 5 s after that)")
    p.add_argument("--tail-chars", type=int, default=TAIL_CHARS, metavar="N",
                   help=f"keep the last N characters of stdout and stderr (default {TAIL_CHARS})")
    p.add_argument("--cgroup-parent", default=None, metavar="DIR",
                   help="where to create the pinion-<pid> group (default: this process's own memory cgroup)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = p.parse_args()
    if args.cmd and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    if not args.cmd:
        p.error("no command given (put it after --)")

    # SIGTERM takes the same path as Ctrl-C, so the cgroup is removed either way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        report = run(args)
    except Fail as e:
        print(f"under-limit: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("under-limit: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(report, indent=1))
    failed = report["exit_code"] != 0 or report["oom_killed"] or report["timed_out"] or report["interrupted"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
