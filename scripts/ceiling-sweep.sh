#!/usr/bin/env bash
# The ceiling sweep of BENCHMARKS.md: the default mixed workload, RUNS times in a row at each
# ceiling (MiB) given, one after another; a row per run and a summary per ceiling.
#
#   scripts/ceiling-sweep.sh [RUNS] [CEILING_MIB ...]        (default: 10 runs, 320 → 224 by 16)
#
# MIXED_WORKLOAD names the binary (default: the dev build scripts/run-demo.sh makes;
# build a release one with `cargo build --release -p tests --bin mixed_workload`).
# OUT names the folder for the per-run JSON reports and the TSV (default: a new temp dir).
# A run "held" when the kernel's high-water mark (VmHWM) stayed within the ceiling; it
# "passed" when the workload's own checks passed too (every query, search, point and
# document complete, no engine over budget).
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-10}"
shift || true
ceilings=("$@")
[ ${#ceilings[@]} -gt 0 ] || ceilings=(320 304 288 272 256 240 224)
bin="${MIXED_WORKLOAD:-${CARGO_TARGET_DIR:-$PWD/target}/debug/mixed_workload}"
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
[ -x "$bin" ] || { echo "no binary at $bin (set MIXED_WORKLOAD)" >&2; exit 2; }
tsv="$out/sweep.tsv"
printf 'ceiling_mib\trun\tpassed\tkernel_hwm_mib\tseconds\tfailure\n' > "$tsv"
echo "binary: $bin ($(git rev-parse --short HEAD)); reports in $out" >&2
for c in "${ceilings[@]}"; do
    for r in $(seq 1 "$runs"); do
        json="$out/c$c-r$r.json"
        "$bin" --quiet --ceiling-mib "$c" --json "$json" > "$out/c$c-r$r.log" 2>&1 || true
        python3 - "$json" "$c" "$r" >> "$tsv" <<'EOF'
import json, sys
path, c, r = sys.argv[1:4]
try:
    d = json.load(open(path))
except Exception as e:
    print(f"{c}\t{r}\tfalse\tnan\tnan\tno report: {e}")
    sys.exit()
first = (d.get("failures") or [""])[0].replace("\t", " ")[:160]
print(f"{c}\t{r}\t{str(d['passed']).lower()}\t{(d['kernel_peak_rss'] or d['peak_rss']) / 2**20:.1f}"
      f"\t{d['elapsed_seconds']:.1f}\t{first}")
EOF
        tail -1 "$tsv" >&2
    done
done
python3 - "$tsv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
print("| ceiling | runs passed | held (kernel high-water mark ≤ ceiling) | kernel high-water marks (MiB) |")
print("|---|---|---|---|")
for c in dict.fromkeys(r["ceiling_mib"] for r in rows):
    rs = [r for r in rows if r["ceiling_mib"] == c]
    hwm = [float(r["kernel_hwm_mib"]) for r in rs]
    held = sum(h <= float(c) for h in hwm)
    passed = sum(r["passed"] == "true" for r in rs)
    print(f"| {c} MiB | {passed} of {len(rs)} | {held} of {len(rs)} | {min(hwm):.1f}–{max(hwm):.1f} |")
EOF
