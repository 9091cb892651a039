//! Parsers for the kernel's memory files: `/proc/self/cgroup`, `/proc/self/mountinfo`,
//! `/proc/meminfo`, the cgroup limit and counter files, and pressure stall information.
//!
//! Each parser takes the file's text and the path to name in an error, and returns a typed
//! value or a [`MemError::Environment`] that says which line is wrong and why. Reading the
//! file (and telling "absent" from "unreadable") is the probe's job, not theirs.
//!
//! Two habits, because these files come from outside the process (a bind mount, a fixture, a
//! hostile or broken runtime) and their errors are logged on every sample of the container
//! watch:
//!
//! * an error quotes at most an excerpt of what it read ([`quote`]): a file may be up to
//!   4 MiB, and a message that repeats it every interval would flood the log;
//! * a number is what the kernel writes (`%llu`: decimal digits), checked before it is
//!   converted ([`decimal`]): Rust's integer parsing also takes a leading `+`, which no kernel
//!   file holds, so `+5` in a limit file is as wrong as `5k`.

use std::path::Path;

use super::{MemoryEvents, Psi, PsiAverages};
use crate::MemError;

/// A cgroup limit or counter value of `u64::MAX` or more than this is "no limit": cgroup v1
/// writes its "unlimited" as `LONG_MAX` rounded down to a page (9223372036854771712), and no
/// machine has 4 EiB of memory.
pub(crate) const UNLIMITED_FROM: u64 = 1 << 62;

/// Bytes of a file's text an error quotes at most (see [`quote`]).
pub(crate) const EXCERPT_BYTES: usize = 200;

/// `text` quoted for an error message: whole (debug-escaped) when it is at most
/// [`EXCERPT_BYTES`] long, else its first [`EXCERPT_BYTES`] bytes (cut back to a character
/// boundary), an ellipsis and the total length, so that the reader still sees what kind of
/// text it was and how much of it there was.
pub(crate) fn quote(text: &str) -> String {
    if text.len() <= EXCERPT_BYTES {
        return format!("{text:?}");
    }
    let mut end = EXCERPT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes in all)", &text[..end], text.len())
}

/// A non-negative decimal number as the kernel writes it: ASCII digits only (no sign, no
/// spaces, no unit), fitting 64 bits. `None` for anything else.
pub(crate) fn decimal(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The value of a one-number file: the kernel writes it followed by one newline (`%llu\n`,
/// or `max\n` for a limit), so exactly that newline is taken off and nothing else is
/// forgiven: a leading space or a second word means the file is not what we think it is.
fn single_value(text: &str) -> &str {
    text.strip_suffix('\n').unwrap_or(text)
}

/// Builds the error for `path`.
pub(crate) fn malformed(path: &Path, reason: impl Into<String>) -> MemError {
    MemError::Environment {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// One line of `/proc/self/cgroup`: `hierarchy-id:controller-list:path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CgroupLine {
    /// The hierarchy id; 0 is the cgroup v2 unified hierarchy.
    pub(crate) id: u32,
    /// The v1 controllers bound to the hierarchy (empty for v2 and for named hierarchies).
    pub(crate) controllers: Vec<String>,
    /// The process's cgroup, relative to the cgroup namespace's root.
    pub(crate) path: String,
}

/// What `/proc/self/cgroup` says about the memory controller's placement.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ProcCgroup {
    /// The path of the `0::<path>` line, if the unified hierarchy is listed.
    pub(crate) unified: Option<String>,
    /// The path of the v1 hierarchy the `memory` controller is bound to, if any.
    pub(crate) v1_memory: Option<String>,
}

/// Parses `/proc/self/cgroup`.
pub(crate) fn proc_cgroup(text: &str, path: &Path) -> Result<ProcCgroup, MemError> {
    let mut out = ProcCgroup::default();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = cgroup_line(line).ok_or_else(|| {
            malformed(
                path,
                format!(
                    "line {}: {} is not `hierarchy-id:controllers:path`",
                    number + 1,
                    quote(line)
                ),
            )
        })?;
        if parsed.id == 0 && parsed.controllers.is_empty() {
            out.unified = Some(parsed.path);
        } else if parsed.controllers.iter().any(|c| c == "memory") {
            out.v1_memory = Some(parsed.path);
        }
    }
    Ok(out)
}

fn cgroup_line(line: &str) -> Option<CgroupLine> {
    // The path may itself contain ':', so split at the first two colons only.
    let mut parts = line.splitn(3, ':');
    let id = u32::try_from(decimal(parts.next()?)?).ok()?;
    let controllers = parts.next()?;
    let path = parts.next()?;
    if !path.starts_with('/') {
        return None;
    }
    let controllers = controllers
        .split(',')
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect();
    Some(CgroupLine {
        id,
        controllers,
        path: path.to_owned(),
    })
}

/// A cgroup filesystem mount, from `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CgroupMount {
    /// Where it is mounted (absolute, in the process's mount namespace).
    pub(crate) mount_point: String,
    /// Which cgroup of the hierarchy appears at the mount point (`/` unless a subtree was
    /// bind-mounted, as container runtimes do for cgroup v1).
    pub(crate) root: String,
}

/// The cgroup mounts `/proc/self/mountinfo` lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct CgroupMounts {
    /// Every `cgroup2` mount, in file order.
    pub(crate) unified: Vec<CgroupMount>,
    /// Every v1 `cgroup` mount with the `memory` controller, in file order.
    pub(crate) v1_memory: Vec<CgroupMount>,
}

/// Parses `/proc/self/mountinfo` (see proc(5)): `id parent major:minor root mount-point
/// options [optional fields...] - fstype source super-options`.
pub(crate) fn mountinfo(text: &str, path: &Path) -> Result<CgroupMounts, MemError> {
    let mut out = CgroupMounts::default();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad =
            |why: &str| malformed(path, format!("line {}: {why}: {}", number + 1, quote(line)));
        let (before, after) = line
            .split_once(" - ")
            .ok_or_else(|| bad("no ` - ` separator before the filesystem type"))?;
        let fields: Vec<&str> = before.split_whitespace().collect();
        if fields.len() < 6 {
            return Err(bad("fewer than six fields before the separator"));
        }
        let mut tail = after.split_whitespace();
        let fstype = tail.next().ok_or_else(|| bad("no filesystem type"))?;
        let super_options = tail.nth(1).unwrap_or("");
        let mount = || CgroupMount {
            root: unescape(fields[3]),
            mount_point: unescape(fields[4]),
        };
        match fstype {
            "cgroup2" => out.unified.push(mount()),
            "cgroup" if super_options.split(',').any(|o| o == "memory") => {
                out.v1_memory.push(mount());
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011` tab, `\012` newline, `\134`
/// backslash); anything else is kept as written.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = u32::from(bytes[i + 1] - b'0') * 64
                + u32::from(bytes[i + 2] - b'0') * 8
                + u32::from(bytes[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/meminfo`'s `MemTotal` (in kB) into bytes.
pub(crate) fn mem_total(text: &str, path: &Path) -> Result<u64, MemError> {
    let line = text
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .ok_or_else(|| malformed(path, "no MemTotal line"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let kib: u64 = words
        .next()
        .and_then(decimal)
        .ok_or_else(|| malformed(path, format!("MemTotal is not a number: {}", quote(line))))?;
    match words.next() {
        Some("kB") => {}
        other => {
            return Err(malformed(
                path,
                format!(
                    "MemTotal's unit is {}, expected kB: {}",
                    other.map_or_else(|| "missing".to_owned(), quote),
                    quote(line)
                ),
            ));
        }
    }
    let bytes = kib
        .checked_mul(1024)
        .ok_or_else(|| malformed(path, format!("MemTotal overflows 64 bits: {}", quote(line))))?;
    if bytes == 0 {
        return Err(malformed(path, "MemTotal is 0"));
    }
    Ok(bytes)
}

/// Parses a single byte count (`memory.current`, `memory.usage_in_bytes`, `memory.failcnt`):
/// decimal digits and an optional final newline, as the kernel writes it.
pub(crate) fn count(text: &str, path: &Path) -> Result<u64, MemError> {
    let value = single_value(text);
    if value.is_empty() {
        return Err(malformed(path, "the file is empty, expected a number"));
    }
    decimal(value).ok_or_else(|| {
        malformed(
            path,
            format!(
                "{} is not a non-negative 64-bit decimal number",
                quote(value)
            ),
        )
    })
}

/// Parses a limit file (`memory.max`, `memory.high`, `memory.limit_in_bytes`): `None` means
/// unlimited (`max`, or a value of at least 2^62 such as v1's 9223372036854771712). The
/// kernel writes `max` or decimal digits, then a newline; a sign, a space or a unit is
/// refused rather than guessed at, since a misread limit is worse than none.
pub(crate) fn limit(text: &str, path: &Path) -> Result<Option<u64>, MemError> {
    let value = single_value(text);
    if value == "max" {
        return Ok(None);
    }
    let value = decimal(value).ok_or_else(|| {
        malformed(
            path,
            format!(
                "{} is neither `max` nor a non-negative 64-bit decimal byte count",
                quote(value)
            ),
        )
    })?;
    Ok((value < UNLIMITED_FROM).then_some(value))
}

/// Parses a `memory.pressure` file (PSI, see Documentation/accounting/psi.rst).
pub(crate) fn psi(text: &str, path: &Path) -> Result<Psi, MemError> {
    let mut some = None;
    let mut full = None;
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let kind = words.next().unwrap_or("");
        let slot = match kind {
            "some" => &mut some,
            "full" => &mut full,
            _ => {
                return Err(malformed(
                    path,
                    format!(
                        "line {}: expected `some` or `full`, found {}",
                        number + 1,
                        quote(line)
                    ),
                ));
            }
        };
        *slot = Some(psi_line(words, path, number + 1, line)?);
    }
    let some = some.ok_or_else(|| malformed(path, "no `some` line"))?;
    Ok(Psi { some, full })
}

fn psi_line<'a>(
    words: impl Iterator<Item = &'a str>,
    path: &Path,
    number: usize,
    line: &str,
) -> Result<PsiAverages, MemError> {
    let (mut avg10, mut avg60, mut avg300, mut total) = (None, None, None, None);
    for word in words {
        let bad = || {
            malformed(
                path,
                format!(
                    "line {number}: bad field {} in {}",
                    quote(word),
                    quote(line)
                ),
            )
        };
        let (key, value) = word.split_once('=').ok_or_else(bad)?;
        match key {
            "avg10" => avg10 = Some(percent(value).ok_or_else(bad)?),
            "avg60" => avg60 = Some(percent(value).ok_or_else(bad)?),
            "avg300" => avg300 = Some(percent(value).ok_or_else(bad)?),
            "total" => total = Some(decimal(value).ok_or_else(bad)?),
            // Later kernels may add fields; ignore what we do not know.
            _ => {}
        }
    }
    let missing =
        |name: &str| malformed(path, format!("line {number}: no {name} in {}", quote(line)));
    Ok(PsiAverages {
        avg10: avg10.ok_or_else(|| missing("avg10"))?,
        avg60: avg60.ok_or_else(|| missing("avg60"))?,
        avg300: avg300.ok_or_else(|| missing("avg300"))?,
        total_micros: total.ok_or_else(|| missing("total"))?,
    })
}

/// A PSI average: a finite percentage in [0, 100].
fn percent(value: &str) -> Option<f64> {
    let v: f64 = value.parse().ok()?;
    (v.is_finite() && (0.0..=100.0).contains(&v)).then_some(v)
}

/// Parses a v2 `memory.events` (or `memory.events.local`) file: `key value` lines. Keys we do
/// not know are ignored (kernels add some, such as `oom_group_kill`); a known key with a
/// value that is not a number is an error.
pub(crate) fn events(text: &str, path: &Path) -> Result<MemoryEvents, MemError> {
    let mut out = MemoryEvents::default();
    let mut seen_any = false;
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || {
            malformed(
                path,
                format!("line {}: expected `key count`: {}", number + 1, quote(line)),
            )
        };
        let (key, value) = line.split_once(' ').ok_or_else(bad)?;
        let slot = match key {
            "low" => &mut out.low,
            "high" => &mut out.high,
            "max" => &mut out.max,
            "oom" => &mut out.oom,
            "oom_kill" => &mut out.oom_kill,
            _ => continue,
        };
        *slot = decimal(value.trim()).ok_or_else(bad)?;
        seen_any = true;
    }
    if !seen_any {
        return Err(malformed(
            path,
            "none of the counters low, high, max, oom, oom_kill is present",
        ));
    }
    Ok(out)
}

/// Parses v1 `memory.oom_control`'s `oom_kill` counter; `None` on kernels before 4.13, which
/// do not report it.
pub(crate) fn oom_control_kills(text: &str, path: &Path) -> Result<Option<u64>, MemError> {
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("oom_kill ") {
            return decimal(value.trim()).map(Some).ok_or_else(|| {
                malformed(path, format!("oom_kill is not a number: {}", quote(line)))
            });
        }
    }
    Ok(None)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("/fixture")
    }

    #[test]
    fn proc_cgroup_finds_unified_and_v1_memory() {
        let text = "9:name=systemd:/\n4:memory:/process_api/abc\n3:cpu,cpuacct:/x\n0::/\n";
        let parsed = proc_cgroup(text, p()).unwrap();
        assert_eq!(parsed.unified.as_deref(), Some("/"));
        assert_eq!(parsed.v1_memory.as_deref(), Some("/process_api/abc"));
        // A path containing ':' is kept whole.
        let parsed = proc_cgroup("0::/a:b\n", p()).unwrap();
        assert_eq!(parsed.unified.as_deref(), Some("/a:b"));
        assert_eq!(parsed.v1_memory, None);
        let err = proc_cgroup("0::/\ngarbage\n", p()).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(err.to_string().contains("/fixture"), "{err}");
    }

    #[test]
    fn mountinfo_finds_cgroup_mounts_and_unescapes() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 /docker/x /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/uni\\040fied rw,relatime - cgroup2 cgroup2 rw
";
        let mounts = mountinfo(text, p()).unwrap();
        assert_eq!(
            mounts.v1_memory,
            vec![CgroupMount {
                mount_point: "/sys/fs/cgroup/memory".into(),
                root: "/docker/x".into()
            }]
        );
        assert_eq!(mounts.unified[0].mount_point, "/sys/fs/cgroup/uni fied");
        assert!(mountinfo("31 23 0:28 / /x rw\n", p()).is_err());
        assert!(mountinfo("31 23 / /x - cgroup2 cgroup2 rw\n", p()).is_err());
        assert_eq!(unescape("a\\134b\\9"), "a\\b\\9");
        assert_eq!(unescape("end\\04"), "end\\04");
    }

    #[test]
    fn meminfo_total_in_bytes() {
        let text = "MemTotal:       24683584 kB\nMemFree: 1 kB\n";
        assert_eq!(mem_total(text, p()).unwrap(), 24_683_584 * 1024);
        assert!(mem_total("MemFree: 1 kB\n", p()).is_err());
        assert!(mem_total("MemTotal: lots kB\n", p()).is_err());
        assert!(mem_total("MemTotal: 12 MB\n", p()).is_err());
        assert!(mem_total("MemTotal: 0 kB\n", p()).is_err());
        assert!(mem_total(&format!("MemTotal: {} kB\n", u64::MAX), p()).is_err());
    }

    #[test]
    fn limits_and_counts() {
        assert_eq!(limit("max\n", p()).unwrap(), None);
        assert_eq!(limit("1048576\n", p()).unwrap(), Some(1 << 20));
        assert_eq!(limit("9223372036854771712\n", p()).unwrap(), None);
        assert_eq!(limit("0\n", p()).unwrap(), Some(0));
        for bad in ["", "\n", "-1", "12k", "18446744073709551616", "max max"] {
            let err = limit(bad, p()).unwrap_err();
            assert!(err.to_string().contains("/fixture"), "{bad:?}: {err}");
        }
        assert_eq!(count("42\n", p()).unwrap(), 42);
        assert!(count("forty-two", p()).is_err());
    }

    /// `u64::from_str` takes a leading `+`; the kernel never writes one, so neither a limit nor
    /// any other number read from a kernel file may hold one. Only the final newline the
    /// kernel writes is forgiven.
    #[test]
    fn numbers_are_digits_as_the_kernel_writes_them() {
        assert_eq!(limit("5\n", p()).unwrap(), Some(5));
        assert_eq!(limit("5", p()).unwrap(), Some(5));
        assert_eq!(limit("max", p()).unwrap(), None);
        for bad in [
            "+5", "+5\n", " 5", "5 ", "5 5", "-1", "5\n\n", " max", "+0", "\t5",
        ] {
            let err = limit(bad, p()).unwrap_err();
            assert!(
                err.to_string().contains("neither `max` nor"),
                "{bad:?}: {err}"
            );
            assert!(count(bad, p()).is_err(), "{bad:?}");
        }
        assert!(mem_total("MemTotal: +5 kB\n", p()).is_err());
        assert!(events("max +1\n", p()).is_err());
        assert!(oom_control_kills("oom_kill +1\n", p()).is_err());
        assert!(psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=+1\n", p()).is_err());
        assert!(proc_cgroup("+0::/\n", p()).is_err());
        assert_eq!(decimal("18446744073709551615"), Some(u64::MAX));
        assert_eq!(decimal("18446744073709551616"), None);
        assert_eq!(decimal(""), None);
    }

    #[test]
    fn quotes_are_bounded_excerpts() {
        assert_eq!(quote("lots\n"), "\"lots\\n\"");
        let long = format!("{}é{}", "a".repeat(EXCERPT_BYTES - 1), "b".repeat(1000));
        let quoted = quote(&long);
        // Cut back to the character boundary before the two-byte 'é'.
        assert_eq!(
            quoted,
            format!(
                "{:?}… ({} bytes in all)",
                "a".repeat(EXCERPT_BYTES - 1),
                long.len()
            )
        );
        // Every parser quotes what it read through `quote`: a 4 MiB line stays a short error.
        let huge = "x".repeat(4 << 20);
        let errors = [
            limit(&huge, p()).unwrap_err(),
            count(&huge, p()).unwrap_err(),
            proc_cgroup(&huge, p()).unwrap_err(),
            mountinfo(&huge, p()).unwrap_err(),
            mem_total(&format!("MemTotal: {huge}"), p()).unwrap_err(),
            mem_total(&format!("MemTotal: 5 {huge}"), p()).unwrap_err(),
            psi(&huge, p()).unwrap_err(),
            psi(&format!("some avg10={huge}"), p()).unwrap_err(),
            psi(&format!("some avg10=0.00 {huge}"), p()).unwrap_err(),
            events(&format!("max {huge}"), p()).unwrap_err(),
            events(&huge, p()).unwrap_err(),
            oom_control_kills(&format!("oom_kill {huge}"), p()).unwrap_err(),
        ];
        for err in errors {
            let message = err.to_string();
            assert!(message.len() < 4 * EXCERPT_BYTES, "{} bytes", message.len());
            assert!(message.contains("/fixture"), "{message}");
        }
    }

    #[test]
    fn psi_parses_some_and_full() {
        let text = "some avg10=12.50 avg60=3.00 avg300=0.10 total=123456\n\
                    full avg10=1.25 avg60=0.00 avg300=0.00 total=99\n";
        let psi = psi(text, p()).unwrap();
        assert!((psi.some.avg10 - 12.5).abs() < 1e-9);
        assert_eq!(psi.some.total_micros, 123_456);
        let full = psi.full.unwrap();
        assert!((full.avg10 - 1.25).abs() < 1e-9);
        // Old kernels report only `some`.
        let only_some =
            super::psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n", p()).unwrap();
        assert!(only_some.full.is_none());
        for bad in [
            "",
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
            "some avg10=x avg60=0.00 avg300=0.00 total=0\n",
            "some avg10=101 avg60=0.00 avg300=0.00 total=0\n",
            "some avg10=NaN avg60=0.00 avg300=0.00 total=0\n",
            "some avg60=0.00 avg300=0.00 total=0\n",
            "half avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        ] {
            assert!(super::psi(bad, p()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn events_counters() {
        let text = "low 1\nhigh 2\nmax 3\noom 4\noom_kill 5\noom_group_kill 0\n";
        let e = events(text, p()).unwrap();
        assert_eq!(
            e,
            MemoryEvents {
                low: 1,
                high: 2,
                max: 3,
                oom: 4,
                oom_kill: 5
            }
        );
        assert!(events("max lots\n", p()).is_err());
        assert!(events("", p()).is_err());
        assert!(events("maxx\n", p()).is_err());
        assert_eq!(
            oom_control_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 7\n", p()).unwrap(),
            Some(7)
        );
        assert_eq!(
            oom_control_kills("oom_kill_disable 0\nunder_oom 0\n", p()).unwrap(),
            None
        );
        assert!(oom_control_kills("oom_kill many\n", p()).is_err());
    }
}
