"""What the benches read about processes: CPU seconds, memory and open files from /proc, and
the open-file limit raised to the hard one.

    import procstat          # (bench/ is on sys.path when a bench runs as a script)
    procstat.cpu_seconds(pid), procstat.status_kib(pid, "VmRSS")
"""

import os
import resource
from pathlib import Path


def raise_nofile() -> int:
    """Raise this process's open-file limit to the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def postgres_cpu(data_dir: str) -> float:
    """CPU seconds of the embedded PostgreSQL's postmaster and its live children."""
    try:
        pm = int(next(Path(data_dir).rglob("postmaster.pid")).read_text().split()[0])
    except (StopIteration, OSError, ValueError):
        return 0.0
    total = cpu_seconds(pm)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pm:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError):
            pass
    return total


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return "/".join(line.split()[3:5])
    return "?"
