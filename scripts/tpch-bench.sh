#!/usr/bin/env bash
# Issue 24's benchmark, side by side in one run on the same Parquet files: TPC-H SF N
# generated as Parquet by `tpchgen` (`tpch-bench gen`), then the 22 queries at each memory
# limit under DataFusion + GreedyMemoryPool, DataFusion + FairSpillPool, DataFusion + the
# governed pool, DataFusion + the governed pool with `memory_safe_state`, and DuckDB
# (memory_limit, threads, temp_directory), each configuration in its own process, every
# completed query checked against an unbounded DataFusion run. Prints the markdown table and
# writes it to <out>/REPORT.md.
#
#   scripts/tpch-bench.sh [--sf 1] [--limits 1G,256M,64M,32M,16M] [--partitions 2]
#                         [--timeout 120] [--grace 10] [--out DIR] [--data DIR]
#                         [--configs greedy,fair,governed,governed-safe,duckdb] [--queries 1,3]
#
# It installs what it needs: the system packages of scripts/setup.sh, DuckDB 1.5.5 from its
# Python package (into a venv under ~/.cache/tpch-bench when python3 lacks it), and the
# release build of tpch-bench/ (its own workspace; CARGO_TARGET_DIR is honoured; a cold build
# of DataFusion takes 30-40 minutes on 2 cores). Results of a configuration already complete
# in <out> are kept (delete <out> to measure again); an interrupted one resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

sf=1
limits=1G,256M,64M,32M,16M
partitions=2
timeout=120
grace=10
configs=greedy,fair,governed,governed-safe,duckdb
queries=
data=
out=
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || { echo "tpch-bench.sh: $1 needs a value" >&2; exit 2; }
    case "$1" in
        --sf) sf=$2 ;;
        --limits) limits=$2 ;;
        --partitions) partitions=$2 ;;
        --timeout) timeout=$2 ;;
        --grace) grace=$2 ;;
        --configs) configs=$2 ;;
        --queries) queries=$2 ;;
        --data) data=$2 ;;
        --out) out=$2 ;;
        *) echo "tpch-bench.sh: unknown option $1 (see the head of $0)" >&2; exit 2 ;;
    esac
    shift 2
done
for v in "$partitions" "$timeout" "$grace"; do
    [[ "$v" =~ ^[0-9]+$ ]] || { echo "tpch-bench.sh: --partitions, --timeout and --grace take whole numbers, got '$v'" >&2; exit 2; }
done
IFS=, read -r -a limit_list <<< "$limits"
IFS=, read -r -a config_list <<< "$configs"
[ ${#limit_list[@]} -gt 0 ] || { echo "tpch-bench.sh: --limits is empty" >&2; exit 2; }
for limit in "${limit_list[@]}"; do
    [[ "$limit" =~ ^[0-9]*\.?[0-9]+[KMGT]$ ]] || { echo "tpch-bench.sh: bad limit '$limit': want e.g. 64M or 1G (K, M, G, T: powers of 1024)" >&2; exit 2; }
done
for c in "${config_list[@]}"; do
    case "$c" in greedy | fair | governed | governed-safe | duckdb) ;;
        *) echo "tpch-bench.sh: unknown configuration '$c' (greedy, fair, governed, governed-safe, duckdb)" >&2; exit 2 ;;
    esac
done
[[ "$sf" =~ ^[0-9]*\.?[0-9]+$ ]] || { echo "tpch-bench.sh: bad --sf '$sf'" >&2; exit 2; }
cache="${HOME:-/root}/.cache/tpch-bench"
data=${data:-$cache/sf$sf}
out=${out:-$cache/results-sf$sf-p$partitions}
mkdir -p "$data" "$out"
data=$(cd "$data" && pwd)
out=$(cd "$out" && pwd)

# The tools.
scripts/setup.sh
python=python3
if [[ ",$configs," == *,duckdb,* ]] && ! python3 -c 'import duckdb; assert duckdb.__version__ == "1.5.5"' 2>/dev/null; then
    if [ ! -x "$cache/venv/bin/python" ] || ! "$cache/venv/bin/python" -c 'import duckdb' 2>/dev/null; then
        echo "tpch-bench.sh: installing duckdb 1.5.5 into $cache/venv" >&2
        mkdir -p "$cache"
        python3 -m venv "$cache/venv"
        "$cache/venv/bin/pip" install -q duckdb==1.5.5 duckdb-extension-tpch==1.5.5
    fi
    python=$cache/venv/bin/python
fi
target="${CARGO_TARGET_DIR:-$root/tpch-bench/target}"
echo "tpch-bench.sh: building tpch-bench (release) in $target" >&2
CARGO_TARGET_DIR=$target cargo build --release --manifest-path tpch-bench/Cargo.toml
bin=$target/release/tpch-bench

# The data, once per scale factor.
"$bin" gen --sf "$sf" --dir "$data"

qargs=()
[ -n "$queries" ] && qargs=(--queries "$queries")

# One configuration, in its own process; again after a stuck query made it exit (status 3)
# so that it resumes after that query.
run_config() {
    local tries=0 rc
    while :; do
        rc=0
        "$@" || rc=$?
        [ $rc -eq 3 ] || break
        tries=$((tries + 1))
        [ $tries -lt 23 ] || break
    done
    [ $rc -eq 0 ] || echo "tpch-bench.sh: $* exited with $rc" >&2
}

# The reference: unbounded DataFusion.
run_config "$bin" run --data "$data" --engine unbounded --partitions "$partitions" \
    --timeout "$timeout" --grace "$grace" --out "$out" "${qargs[@]}"
for limit in "${limit_list[@]}"; do
    for c in "${config_list[@]}"; do
        case "$c" in
            duckdb)
                run_config "$python" scripts/tpch_duckdb.py --data "$data" --limit "$limit" \
                    --threads "$partitions" --timeout "$timeout" --grace "$grace" \
                    --queries-file datafusion-pool/tpch/queries.sql --out "$out" \
                    ${queries:+--queries "$queries"} ;;
            greedy | fair | governed | governed-safe)
                run_config "$bin" run --data "$data" --engine "$c" --limit "$limit" \
                    --partitions "$partitions" --timeout "$timeout" --grace "$grace" \
                    --out "$out" "${qargs[@]}" ;;
            *) echo "tpch-bench.sh: unknown configuration $c" >&2; exit 2 ;;
        esac
    done
done

{
    echo "TPC-H SF $sf (Parquet from tpchgen), $partitions partitions/threads, timeout ${timeout}s per query; $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB RAM"
    echo
    "$bin" report --dir "$out"
} > "$out/REPORT.md"
cat "$out/REPORT.md"
