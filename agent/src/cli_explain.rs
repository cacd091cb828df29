//! The `explain` and `replay` commands: loading, output and exit status.

use std::{
    io::BufRead as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use portcullis::{
    explain::{self, Request},
    policy::{self, Policy},
    replay,
};

fn load(paths: &[PathBuf]) -> Option<Vec<Policy>> {
    match policy::load_paths(paths) {
        Ok(p) => Some(p),
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!("{} error(s)", errors.len());
            None
        }
    }
}

/// Explains `one`, or every decision line of `log`.
pub fn explain(
    policies: &[PathBuf],
    log: Option<&Path>,
    one: Option<Result<Request, String>>,
    json: bool,
) -> ExitCode {
    let Some(policies) = load(policies) else {
        return ExitCode::FAILURE;
    };
    let requests: Vec<Result<Request, String>> = match (one, log) {
        (Some(r), _) => vec![r],
        (None, Some(log)) => {
            let reader: Box<dyn std::io::BufRead> = if log == Path::new("-") {
                Box::new(std::io::stdin().lock())
            } else {
                match std::fs::File::open(log) {
                    Ok(f) => Box::new(std::io::BufReader::new(f)),
                    Err(e) => {
                        eprintln!("{}: {e}", log.display());
                        return ExitCode::FAILURE;
                    }
                }
            };
            reader
                .lines()
                .map_while(Result::ok)
                .filter(|l| !l.trim().is_empty())
                .filter_map(|l| Request::from_log_line(&l).transpose())
                .collect()
        }
        (None, None) => {
            eprintln!("give a request (--exec, --open or --connect) or --log");
            return ExitCode::FAILURE;
        }
    };
    let mut ok = true;
    for r in requests {
        match r.and_then(|r| explain::explain(&policies, r)) {
            Ok(e) if json => println!("{}", serde_json::to_string(&e).unwrap_or_default()),
            Ok(e) => println!("{}", e.text()),
            Err(e) => {
                eprintln!("{e}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub fn replay(policies: &[PathBuf], files: &[PathBuf], json: bool) -> ExitCode {
    let Some(policies) = load(policies) else {
        return ExitCode::FAILURE;
    };
    match replay::replay(&policies, files) {
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                print!("{}", r.text());
            }
            if r.changed.is_empty() && r.errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
