//! Documentation generated from the clap definitions, so it cannot drift
//! from `--help`: man pages (section 8, portwatch is an administrator's
//! daemon) and shell completion scripts. The Debian package ships both.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::args::Cli;

/// The man page section: system administration commands and daemons.
pub const SECTION: &str = "8";

/// Appended to portwatch.8: what clap does not describe.
const FILES_AND_SIGNALS: &str = r#".SH FILES
.TP
\fI/etc/portwatch/policy.toml\fR
The guard's policy (TOML). Runtime changes (\fBportwatch allow\fR, \fBportwatch deny\fR) are written back to it.
.TP
\fI/run/portwatch/control.sock\fR
The running guard's control socket (JSON Lines), and its lock file \fIcontrol.sock.lock\fR.
.TP
\fI/sys/fs/bpf/portwatch\fR
The pinned datapath: the guard's maps and XDP and tc links. Enforcement stays while it exists; \fBportwatch down\fR removes it.
.SH SIGNALS
SIGHUP makes a running guard re\-read its policy file. SIGTERM and SIGINT stop it; enforcement stays pinned unless \fB\-\-detach\-on\-exit\fR was given.
"#;

/// Every man page: `portwatch.8` and one per visible subcommand
/// (`portwatch-guard.8`, ...), as (file name, roff text).
pub fn man_pages() -> Result<Vec<(String, Vec<u8>)>> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let subcommands: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();

    let mut pages = Vec::with_capacity(subcommands.len() + 1);
    let mut top = render(cmd.clone())?;
    // clap_mangen's SUBCOMMANDS section already names each page.
    top.extend_from_slice(FILES_AND_SIGNALS.as_bytes());
    pages.push((format!("{}.{SECTION}", cmd.get_name()), top));

    for sub in subcommands {
        let name = page_name(&sub);
        let mut page = render(sub)?;
        page.extend_from_slice(
            format!(
                ".SH \"SEE ALSO\"\n\\fB{}\\fR({SECTION})\n",
                roff_escape(cmd.get_name())
            )
            .as_bytes(),
        );
        pages.push((format!("{name}.{SECTION}"), page));
    }
    Ok(pages)
}

/// `portwatch-guard` for the guard subcommand (clap's display name).
fn page_name(cmd: &clap::Command) -> String {
    cmd.get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string()
}

fn render(cmd: clap::Command) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd)
        .section(SECTION)
        .manual("System Manager's Manual")
        .render(&mut out)
        .context("rendering a man page")?;
    Ok(out)
}

/// Hyphens in roff text are written `\-` so they print as ASCII hyphens
/// (and copy-paste into a shell).
fn roff_escape(s: &str) -> String {
    s.replace('-', "\\-")
}

/// Writes every man page into `dir` (created if missing); returns the paths.
pub fn write_man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for (name, text) in man_pages()? {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// The completion script for `shell`.
pub fn completions(shell: Shell) -> Vec<u8> {
    let full = Cli::command();
    // clap_complete offers hidden subcommands too; the packaging helper
    // (`manpage`) is left out by completing a copy without them.
    let mut cmd = clap::Command::new("portwatch")
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "portwatch", &mut out);
    out
}

/// `portwatch completions SHELL`: the script on stdout.
pub fn print_completions(shell: Shell) -> Result<()> {
    std::io::stdout()
        .write_all(&completions(shell))
        .context("writing the completion script to stdout")
}

/// `portwatch manpage [--out DIR]`: every page into DIR, or portwatch.8 on
/// stdout without it.
pub fn manpage(out: Option<&Path>) -> Result<()> {
    match out {
        Some(dir) => {
            for path in write_man_pages(dir)? {
                println!("{}", path.display());
            }
            Ok(())
        }
        None => {
            let pages = man_pages()?;
            let top = pages
                .first()
                .map(|(_, text)| text.as_slice())
                .unwrap_or(&[]);
            std::io::stdout()
                .write_all(top)
                .context("writing the man page to stdout")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible_subcommands() -> Vec<String> {
        Cli::command()
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| s.get_name().to_string())
            .collect()
    }

    #[test]
    fn the_main_page_mentions_every_subcommand_and_each_has_its_own_page() {
        let pages = man_pages().expect("man pages render");
        let (name, top) = &pages[0];
        assert_eq!(name, "portwatch.8");
        let top = String::from_utf8_lossy(top);
        assert!(top.starts_with(".ie \\n(.g .ds Aq") || top.contains(".TH portwatch 8"));
        let subs = visible_subcommands();
        assert!(subs.len() >= 10, "{subs:?}");
        for sub in &subs {
            let escaped = roff_escape(sub);
            assert!(
                top.contains(&escaped),
                "portwatch.8 does not mention `{sub}`"
            );
            let file = format!("portwatch-{sub}.8");
            let page = pages
                .iter()
                .find(|(n, _)| *n == file)
                .unwrap_or_else(|| panic!("no page {file}"));
            assert!(
                String::from_utf8_lossy(&page.1).contains(".TH"),
                "{file} has no title line"
            );
        }
        assert!(top.contains("/etc/portwatch/policy.toml"));
        assert!(top.contains("portwatch\\-guard(8)"));
        // The hidden generator is not documented.
        assert!(!pages.iter().any(|(n, _)| n.contains("manpage")));
        assert_eq!(pages.len(), subs.len() + 1);
    }

    #[test]
    fn the_guard_page_documents_its_options() {
        let pages = man_pages().expect("man pages render");
        let guard = pages
            .iter()
            .find(|(n, _)| n == "portwatch-guard.8")
            .expect("portwatch-guard.8");
        let text = String::from_utf8_lossy(&guard.1);
        for option in [
            "policy",
            "control\\-group",
            "pin\\-dir",
            "detach\\-on\\-exit",
        ] {
            assert!(text.contains(option), "portwatch-guard.8 lacks --{option}");
        }
    }

    #[test]
    fn completions_generate_for_every_shell() {
        for shell in [
            Shell::Bash,
            Shell::Zsh,
            Shell::Fish,
            Shell::Elvish,
            Shell::PowerShell,
        ] {
            let script = String::from_utf8(completions(shell)).expect("UTF-8 script");
            assert!(script.contains("portwatch"), "{shell}: no program name");
            for word in ["guard", "check-policy", "completions", "pin-dir"] {
                assert!(script.contains(word), "{shell}: no `{word}`");
            }
            assert!(
                !script.contains("manpage"),
                "{shell}: offers the hidden manpage"
            );
        }
    }

    #[test]
    fn pages_are_written_to_a_directory() {
        let dir = std::env::temp_dir().join(format!("pwman{}", std::process::id()));
        let written = write_man_pages(&dir).expect("pages written");
        let sizes: Vec<u64> = written
            .iter()
            .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
            .collect();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(written.iter().any(|p| p.ends_with("portwatch.8")));
        assert!(written.iter().any(|p| p.ends_with("portwatch-guard.8")));
        assert!(sizes.iter().all(|&n| n > 100), "{written:?}: {sizes:?}");
    }
}
