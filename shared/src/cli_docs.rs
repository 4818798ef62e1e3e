//! Shell completions and man pages, generated from each binary's own `clap` definition so they can
//! never drift from `--help`: `<binary> completions <shell>` and `<binary> man [--out-dir DIR]`.
//! The Docker image ships the man pages; packagers run the same commands.

use clap::{ArgMatches, Args, Command, FromArgMatches, Subcommand};
use clap_complete::Shell;
use std::io::Write;
use std::path::PathBuf;

// The two subcommands every binary gains next to its own. (A doc comment here would replace the
// binary's own description in `--help`.)
#[derive(Debug, Subcommand)]
pub enum DocCommand {
    /// Print a shell completion script (e.g. `source <(worker completions bash)`).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the man page, or with `--out-dir` write one page per command (`<name>.1`,
    /// `<name>-<subcommand>.1`, …) into that directory.
    Man(ManArgs),
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Directory to write the pages into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// `command` with `completions` and `man` added. Required settings are waived for them: printing a
/// completion script needs no broker URL.
pub fn with_doc_commands(command: Command) -> Command {
    DocCommand::augment_subcommands(command).subcommand_negates_reqs(true)
}

impl DocCommand {
    /// The doc command the user asked for, if any.
    pub fn from_matches(matches: &ArgMatches) -> Option<Self> {
        match matches.subcommand_name() {
            Some("completions" | "man") => Self::from_arg_matches(matches).ok(),
            _ => None,
        }
    }

    /// Writes the completion script or man page(s) of `command` (as given to [`with_doc_commands`]).
    pub fn run(self, mut command: Command, out: &mut dyn Write) -> std::io::Result<()> {
        let name = command.get_name().to_owned();
        match self {
            Self::Completions { shell } => {
                clap_complete::generate(shell, &mut command, name, out);
                Ok(())
            }
            Self::Man(ManArgs { out_dir: None }) => clap_mangen::Man::new(command).render(out),
            Self::Man(ManArgs { out_dir: Some(dir) }) => {
                std::fs::create_dir_all(&dir)?;
                clap_mangen::generate_to(command, &dir)?;
                writeln!(out, "man pages written to {}", dir.display())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A binary shaped like ingest: a required secret and no subcommands of its own.
    #[derive(Debug, Parser)]
    #[command(name = "demo")]
    struct Demo {
        #[arg(long, env = "DEMO_SECRET_FOR_DOCS_TEST")]
        secret: String,
        #[arg(long, default_value = "127.0.0.1:1")]
        listen_addr: String,
    }

    fn run(args: &[&str]) -> String {
        let command = with_doc_commands(<Demo as clap::CommandFactory>::command());
        let matches = command.clone().try_get_matches_from(args).expect("parses without the secret");
        let doc = DocCommand::from_matches(&matches).expect("a doc command");
        let mut out = Vec::new();
        doc.run(command, &mut out).expect("writes");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn completions_need_no_required_setting_and_know_every_flag() {
        let script = run(&["demo", "completions", "bash"]);
        assert!(script.contains("--listen-addr"), "{script}");
        assert!(script.contains("complete "), "{script}");
    }

    #[test]
    fn the_man_page_names_each_flag_and_its_environment_variable() {
        let page = run(&["demo", "man"]);
        assert!(page.starts_with(".ie") || page.contains(".TH demo"), "{page}");
        assert!(page.contains("listen\\-addr"), "{page}");
        assert!(page.contains("DEMO_SECRET_FOR_DOCS_TEST"), "{page}");
    }

    #[test]
    fn the_man_directory_gets_one_page_per_command() {
        let dir = std::env::temp_dir().join(format!("monohook-man-{}", std::process::id()));
        let out = run(&["demo", "man", "--out-dir", dir.to_str().expect("utf-8 path")]);
        assert!(out.contains("man pages written"));
        assert!(dir.join("demo.1").is_file());
        assert!(dir.join("demo-completions.1").is_file());
        std::fs::remove_dir_all(&dir).expect("cleans up");
    }

    #[test]
    fn an_ordinary_run_is_not_a_doc_command() {
        let command = with_doc_commands(<Demo as clap::CommandFactory>::command());
        let matches = command.try_get_matches_from(["demo", "--secret", "s"]).expect("parses");
        assert!(DocCommand::from_matches(&matches).is_none());
        let missing = with_doc_commands(<Demo as clap::CommandFactory>::command())
            .try_get_matches_from(["demo"])
            .expect_err("the secret is still required to run");
        assert_eq!(missing.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }
}
