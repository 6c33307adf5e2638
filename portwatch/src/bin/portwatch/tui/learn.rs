//! `top`'s learned-policy view (`L`): the guard's proposal rule by rule,
//! each accepted or skipped, and the policy file the accepted ones make,
//! applied with a confirmation window. Pure state; [`super::ui`] draws it.

use portwatch::control::protocol::Proposal;
use ratatui::crossterm::event::{KeyCode, KeyEvent};

/// How long an applied proposal waits for `C` before the guard reverts it.
pub const CONFIRM_WITHIN: u64 = 120;

/// What a key in the view asks of the loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LearnAction {
    /// Ask the guard for a (new) proposal.
    Fetch,
    /// Apply this policy file text, reverting unless confirmed.
    Apply(String),
    /// Keep the applied change.
    Confirm,
    Close,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LearnView {
    /// None while the guard is asked.
    pub proposal: Option<Proposal>,
    /// Per rule: accepted (the default) or skipped.
    pub accepted: Vec<bool>,
    pub selected: usize,
    /// The guard's answer when it could not propose.
    pub error: Option<String>,
    /// An applied proposal awaits `C`.
    pub awaiting_confirm: bool,
}

impl LearnView {
    /// A proposal arrived: every rule accepted.
    pub fn on_proposal(&mut self, proposal: Result<Proposal, String>) {
        match proposal {
            Ok(p) => {
                self.accepted = vec![true; p.rules.len()];
                self.selected = self.selected.min(p.rules.len().saturating_sub(1));
                self.proposal = Some(p);
                self.error = None;
            }
            Err(e) => {
                self.proposal = None;
                self.accepted.clear();
                self.error = Some(e);
            }
        }
    }

    /// The policy file of the accepted rules.
    pub fn text(&self) -> Option<String> {
        self.proposal
            .as_ref()
            .map(|p| p.render(|i| self.accepted.get(i).copied().unwrap_or(false)))
    }

    pub fn accepted_count(&self) -> usize {
        self.accepted.iter().filter(|a| **a).count()
    }

    pub fn on_key(&mut self, key: KeyEvent) -> Option<LearnAction> {
        let n = self.accepted.len();
        match key.code {
            KeyCode::Esc | KeyCode::Char('q') | KeyCode::Char('L') => {
                return Some(LearnAction::Close);
            }
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::Down | KeyCode::Char('j') => {
                self.selected = (self.selected + 1).min(n.saturating_sub(1));
            }
            KeyCode::Char(' ') | KeyCode::Enter => {
                if let Some(a) = self.accepted.get_mut(self.selected) {
                    *a = !*a;
                }
            }
            KeyCode::Char('a') => self.accepted.iter_mut().for_each(|a| *a = true),
            KeyCode::Char('n') => self.accepted.iter_mut().for_each(|a| *a = false),
            KeyCode::Char('r') => {
                self.proposal = None;
                return Some(LearnAction::Fetch);
            }
            KeyCode::Char('A') => {
                let text = self.text()?;
                self.awaiting_confirm = true;
                return Some(LearnAction::Apply(text));
            }
            KeyCode::Char('C') if self.awaiting_confirm => {
                self.awaiting_confirm = false;
                return Some(LearnAction::Confirm);
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use portwatch::control::protocol::ProposedRule;
    use ratatui::crossterm::event::KeyModifiers;

    use super::*;

    fn key(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    fn proposal() -> Proposal {
        let rule = |port: &str| ProposedRule {
            toml: format!("\"{port}\""),
            comment: vec![format!("for {port}")],
            port: port.into(),
            ssh: false,
        };
        Proposal {
            header: vec!["proposed".into()],
            settings: vec!["mode = \"enforce\"".into()],
            rules: vec![rule("tcp/22"), rule("tcp/80"), rule("udp/53")],
            ..Proposal::default()
        }
    }

    #[test]
    fn skipped_rules_stay_out_of_the_applied_text() {
        let mut v = LearnView::default();
        assert_eq!(
            v.on_key(key(KeyCode::Char('A'))),
            None,
            "nothing to apply yet"
        );
        v.on_proposal(Ok(proposal()));
        assert_eq!(v.accepted_count(), 3);
        v.on_key(key(KeyCode::Down));
        v.on_key(key(KeyCode::Char(' ')));
        assert_eq!(v.accepted, vec![true, false, true]);
        let Some(LearnAction::Apply(text)) = v.on_key(key(KeyCode::Char('A'))) else {
            panic!("A applies");
        };
        assert!(
            text.contains("\"tcp/22\"") && text.contains("\"udp/53\""),
            "{text}"
        );
        assert!(!text.contains("\"tcp/80\""), "{text}");
        assert!(
            text.starts_with("# proposed\nmode = \"enforce\"\n"),
            "{text}"
        );
        assert_eq!(
            v.on_key(key(KeyCode::Char('C'))),
            Some(LearnAction::Confirm)
        );
        assert_eq!(v.on_key(key(KeyCode::Char('C'))), None, "confirmed once");
        v.on_key(key(KeyCode::Char('n')));
        assert_eq!(v.accepted_count(), 0);
        let Some(LearnAction::Apply(none)) = v.on_key(key(KeyCode::Char('A'))) else {
            panic!("A applies");
        };
        assert!(none.contains("allow = []"), "{none}");
        assert_eq!(v.on_key(key(KeyCode::Char('r'))), Some(LearnAction::Fetch));
        assert!(v.proposal.is_none());
        v.on_proposal(Err("no guard".into()));
        assert_eq!(v.error.as_deref(), Some("no guard"));
        assert_eq!(v.on_key(key(KeyCode::Esc)), Some(LearnAction::Close));
    }
}
