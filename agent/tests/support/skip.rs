//! How a test reports that it cannot run here. Shared by the agent's and the
//! end-to-end test crates (`#[path]`-included by both).

use std::io::Write as _;

/// Reports the calling test as skipped: a `SKIP:` line on stderr (the VM
/// harness counts those on the console) and, when `PORTCULLIS_SKIP_LOG` names
/// a file, a line there, because cargo reports a test that returned early as
/// `ok` and `cargo xtask test` lists the skips after the host suite.
pub fn skip(why: &str) {
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    eprintln!("SKIP: {test}: {why}");
    if let Some(log) = std::env::var_os("PORTCULLIS_SKIP_LOG") {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| writeln!(f, "{test}: {why}"));
        if let Err(e) = appended {
            eprintln!("SKIP log {}: {e}", log.to_string_lossy());
        }
    }
}
