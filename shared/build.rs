//! Hands the git revision to the code, for every binary's `--version`. A build with no repository
//! (a Docker build, whose context leaves `.git` out) may pass it as `VERGEN_GIT_SHA`; otherwise
//! the revision reads "unknown".

use vergen_gitcl::{Emitter, GitclBuilder};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=VERGEN_GIT_SHA");
    let git = GitclBuilder::default().sha(true).dirty(false).build()?;
    Emitter::default().add_instructions(&git)?.emit()?;
    Ok(())
}
