//! The policy set in force, swapped atomically when a new valid set arrives (from the policy
//! directory under the embedded default, or from Redis where every replica reads the same
//! published set). A set with errors never replaces a working one: its errors are kept for
//! `/readyz` and the log.

use std::sync::{Arc, RwLock};

use super::PolicySet;
use super::file::PolicyFileError;

/// The current set and the last rejected one's problems.
#[derive(Debug)]
pub struct LivePolicies {
    current: RwLock<Arc<PolicySet>>,
    last_error: RwLock<Option<String>>,
}

impl LivePolicies {
    /// Start with `set`.
    pub fn new(set: PolicySet) -> Self {
        Self {
            current: RwLock::new(Arc::new(set)),
            last_error: RwLock::new(None),
        }
    }

    /// The set in force: a snapshot, unaffected by later swaps.
    pub fn current(&self) -> Arc<PolicySet> {
        // Writers only replace the Arc, so a poisoned lock still holds a complete set.
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Problems of the last set that was refused, until a valid one arrives.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The source is back to the set in force: forget the last refusal.
    pub fn clear_error(&self) {
        *self
            .last_error
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// Offer a freshly loaded set: swapped in if valid and new; otherwise the working set
    /// stays. Returns whether the set in force changed.
    pub fn offer(&self, loaded: Result<PolicySet, Vec<PolicyFileError>>) -> bool {
        let mut last_error = self
            .last_error
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match loaded {
            Ok(set) => {
                *last_error = None;
                let mut current = self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if current.version() == set.version() {
                    return false;
                }
                tracing::info!(version = %set.version(), policies = set.len(), "policy set switched");
                *current = Arc::new(set);
                true
            }
            Err(errors) => {
                let text = errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::error!(errors = %text, "new policy set refused; the working set stays in force");
                }
                *last_error = Some(text);
                false
            }
        }
    }
}
