//! Unique names for what the lab creates on the host.

use std::sync::atomic::{AtomicU32, Ordering};

/// A name no other call (or concurrent run) uses: `pw`, the tag, this
/// process's id, a counter. Fixed names collide between tests.
pub fn unique_name(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "pw{tag}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_differ_and_carry_the_tag() {
        let (a, b) = (unique_name("s"), unique_name("s"));
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("pws{}x", std::process::id())), "{a}");
    }
}
