#!/usr/bin/env python3
"""DuckDB's side of the TPC-H benchmark (`scripts/tpch-bench.sh`): the 22 queries of
`datafusion-pool/tpch/queries.sql` on the Parquet files `tpch-bench gen` wrote, under one
memory limit, in this process, written in the same result format as `tpch-bench run`:

* `<out>/duckdb-<limit>.json`: one record per query (status ok/oom/error/timeout, ms, rows),
  the process's peak RSS (VmHWM) and whether the run is complete; rewritten after every
  query, and resumed from when the run is started again;
* `<out>/duckdb-<limit>.rows/qNN.json`: each completed query's rows as text, rendered by the
  rules of `tpch-bench/src/canon.rs` (decimals as fixed-point text, floats always with an
  exponent, dates ISO 8601, NULL as `NULL`), for `tpch-bench report` to compare with the
  unbounded DataFusion run.

A query that runs past --timeout is interrupted (`Connection.interrupt`); if it does not stop
within --grace seconds the run records it as a timeout and exits with status 3, and the next
run with the same arguments resumes after it.
"""

import argparse
import datetime
import decimal
import json
import os
import re
import shutil
import sys
import threading
import time

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_limit(text):
    """Bytes of a `64M`-style limit, with the rules of `tpch-bench`'s `parse_limit`."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)([KMGTkmgt])\s*", text)
    if not m:
        raise ValueError(f"bad limit {text!r}: want a positive number and K, M, G or T, e.g. 64M")
    n = float(m.group(1)) * UNITS[m.group(2).upper()]
    if not (1 << 20) <= n < (1 << 50):
        raise ValueError(f"bad limit {text!r}: between 1M and 1024T")
    return int(n)


def parse_queries(text):
    """`(number, sql)` pairs as `datafusion-pool/tpch/queries.rs` parses the file."""
    out = []
    for line in text.splitlines():
        m = re.fullmatch(r"-- Q\s*(\d+)\s*", line)
        if m:
            out.append([int(m.group(1)), ""])
        elif out and not line.startswith("--"):
            out[-1][1] += line + "\n"
    return [(n, sql.strip().rstrip(";")) for n, sql in out]


def render(value):
    """A value as the rows file writes it (see the module doc)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value != value:
            return "NaN"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        text = repr(value + 0.0)  # -0.0 + 0.0 is 0.0
        return text if "e" in text else text + "e0"
    if isinstance(value, decimal.Decimal):
        return format(value, "f")
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    return str(value)


def status_file_value(key):
    """A `kB` field of /proc/self/status, in bytes; 0 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="directory of the Parquet files")
    ap.add_argument("--limit", required=True, help="memory_limit, e.g. 64M (powers of 1024)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=120, help="seconds per query")
    ap.add_argument("--grace", type=int, default=10, help="seconds an interrupted query gets to stop")
    ap.add_argument("--queries-file", required=True, help="datafusion-pool/tpch/queries.sql")
    ap.add_argument("--queries", default="", help="only these, e.g. 1,3,18")
    ap.add_argument("--out", required=True, help="directory of the results")
    a = ap.parse_args()

    try:
        import duckdb
    except ImportError:
        sys.exit("tpch_duckdb: the duckdb package is missing (pip install duckdb==1.5.5)")
    try:
        limit_bytes = parse_limit(a.limit)
        if a.threads < 1 or a.timeout < 1:
            raise ValueError("--threads and --timeout must be at least 1")
        only = {int(q) for q in a.queries.split(",") if q.strip()}
        if any(q < 1 or q > 22 for q in only):
            raise ValueError("--queries: each must be in 1..=22")
    except ValueError as e:
        sys.exit(f"tpch_duckdb: {e}")
    marker = os.path.join(a.data, ".tpch-complete")
    try:
        with open(marker) as f:
            sf = f.read().strip().removeprefix("sf=")
    except OSError:
        sys.exit(f"tpch_duckdb: {a.data} holds no complete data set (run `tpch-bench gen`)")
    try:
        with open(a.queries_file) as f:
            queries = parse_queries(f.read())
    except OSError as e:
        sys.exit(f"tpch_duckdb: {e}")
    if [n for n, _ in queries] != list(range(1, 23)):
        sys.exit(f"tpch_duckdb: {a.queries_file} must hold Q1..Q22 in order")

    name = f"duckdb-{a.limit}"
    rows_dir = os.path.join(a.out, name + ".rows")
    spill = os.path.join(a.out, "spill", name)
    os.makedirs(rows_dir, exist_ok=True)
    os.makedirs(spill, exist_ok=True)
    path = os.path.join(a.out, name + ".json")
    header = {
        "config": name,
        "engine": "duckdb",
        "limit": a.limit,
        "limit_bytes": limit_bytes,
        "partitions": a.threads,
        "sf": sf,
        "timeout_s": a.timeout,
        "duckdb_version": duckdb.__version__,
    }
    records, earlier_peak = [], 0
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("complete") and old.get("partitions") == a.threads:
            print(f"{name}: already complete in {path}")
            return 0
        if old.get("partitions") == a.threads and old.get("sf") == sf:
            records = old.get("queries", [])
            earlier_peak = old.get("peak_rss_bytes", 0)

    def write(complete):
        doc = dict(header)
        doc["queries"] = records
        doc["peak_rss_bytes"] = max(earlier_peak, status_file_value("VmHWM"))
        doc["complete"] = complete
        with open(path + ".tmp", "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(path + ".tmp", path)

    con = duckdb.connect(":memory:")
    con.execute(f"SET memory_limit = '{limit_bytes // 1024}KiB'")
    con.execute(f"SET threads = {a.threads}")
    con.execute("SET temp_directory = '" + spill.replace("'", "''") + "'")
    for t in ["lineitem", "orders", "customer", "part", "partsupp", "supplier", "nation", "region"]:
        files = os.path.join(a.data, t, "*.parquet").replace("'", "''")
        con.execute(f"CREATE VIEW {t} AS SELECT * FROM read_parquet('{files}')")
    header["rss_at_start_bytes"] = status_file_value("VmRSS")

    done = {r["q"] for r in records}
    for n, sql in queries:
        if (only and n not in only) or n in done:
            continue
        box = {}

        def work(sql=sql, box=box):
            start = time.perf_counter()
            try:
                rows = con.execute(sql).fetchall()
                box["rows"] = rows
            except Exception as e:  # every failure is recorded, none ends the run
                box["error"] = e
            box["ms"] = (time.perf_counter() - start) * 1e3

        th = threading.Thread(target=work, daemon=True)
        th.start()
        th.join(a.timeout)
        if th.is_alive():
            con.interrupt()
            th.join(a.grace)
            records.append({"q": n, "status": "timeout", "ms": a.timeout * 1e3, "rows": None,
                            "error": f"no result in {a.timeout}s"})
            write(False)
            if th.is_alive():
                print(f"{name}: Q{n} did not stop within {a.grace}s of its interrupt; exiting, "
                      "run again to resume", file=sys.stderr)
                sys.stdout.flush()
                os._exit(3)
            print(f"{name}: Q{n} timeout", flush=True)
            continue
        if "rows" in box:
            rows = [[render(v) for v in r] for r in box["rows"]]
            with open(os.path.join(rows_dir, f"q{n:02}.json"), "w") as f:
                json.dump({"rows": rows}, f)
            rec = {"q": n, "status": "ok", "ms": box["ms"], "rows": len(rows), "error": None}
        else:
            e = box.get("error")
            msg = " ".join(str(e).split())[:600]
            oom = isinstance(e, getattr(duckdb, "OutOfMemoryException", ())) or "out of memory" in msg.lower()
            rec = {"q": n, "status": "oom" if oom else "error", "ms": box.get("ms", 0.0),
                   "rows": None, "error": msg}
        records.append(rec)
        write(False)
        print(f"{name}: Q{n} {rec['status']} {rec['ms']:.0f} ms", flush=True)
    write(True)
    con.close()
    shutil.rmtree(spill, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
