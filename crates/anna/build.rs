//! Records the git commit the binary is built from, for `anna --version` and the
//! `anna_build_info` metric. `ANNA_GIT_COMMIT` wins (a container build has no `.git`); without
//! either the commit is "unknown".

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (output.status.success() && !text.is_empty()).then(|| text.to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=ANNA_GIT_COMMIT");
    let commit = match std::env::var("ANNA_GIT_COMMIT") {
        Ok(commit) if !commit.trim().is_empty() => commit.trim().to_owned(),
        _ => {
            // Rebuild when HEAD moves: the HEAD file changes on checkout, the ref file on commit.
            // A path that does not exist would make cargo rerun this script on every build.
            let mut watched = vec![
                git(&["rev-parse", "--git-path", "HEAD"]),
                git(&["rev-parse", "--git-path", "packed-refs"]),
                git(&["rev-parse", "--git-path", "refs/heads"]),
            ];
            if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
                watched.push(git(&["rev-parse", "--git-path", &reference]));
            }
            for path in watched.into_iter().flatten().filter(|p| std::path::Path::new(p).exists()) {
                println!("cargo:rerun-if-changed={path}");
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
        }
    };
    println!("cargo:rustc-env=ANNA_GIT_COMMIT={commit}");
}
