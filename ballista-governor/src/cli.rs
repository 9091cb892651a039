//! What the crate's binaries share: running an async `main` on a multi-thread runtime and
//! reporting its error under the binary's name.

use std::future::Future;

/// Runs `main` on a new multi-thread Tokio runtime. On an error (or a runtime that cannot
/// start) prints `name: error` on stderr and returns `None`; the caller picks the exit code.
pub fn block_on_main<T>(name: &str, main: impl Future<Output = Result<T, String>>) -> Option<T> {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{name}: cannot start a runtime: {e}");
            return None;
        }
    };
    match runtime.block_on(main) {
        Ok(value) => Some(value),
        Err(e) => {
            eprintln!("{name}: {e}");
            None
        }
    }
}
