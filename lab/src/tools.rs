//! Finding the programs the lab and its users run.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// The first executable called `name` on PATH.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Fails, naming the first missing one and what installs it, unless every
/// tool is on PATH.
pub fn require_tools(tools: &[&str]) -> Result<()> {
    if let Some(missing) = tools.iter().find(|t| find_in_path(t).is_none()) {
        bail!("{missing} not found (run `cargo xtask setup`)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh_and_names_what_is_missing() {
        assert!(find_in_path("sh").is_some());
        let err = require_tools(&["sh", "pw-lab-no-such-tool"])
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("pw-lab-no-such-tool not found (run `cargo xtask setup`)")
        );
    }
}
