//! Fresh SQLite databases for tests.

use uuid::Uuid;

/// `sqlite:<temp dir>/anna-test-<uuid>/anna.db`. The folder does not exist yet: creating it
/// is the store's job, and tests that use this URL check that it does. Nothing deletes the
/// folder afterwards, so a failing test leaves its database behind to inspect.
pub fn fresh_database_url() -> String {
    let dir = std::env::temp_dir().join(format!("anna-test-{}", Uuid::new_v4()));
    format!("sqlite:{}", dir.join("anna.db").display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_names_a_new_folder() {
        let (a, b) = (fresh_database_url(), fresh_database_url());
        assert_ne!(a, b);
        assert!(a.starts_with("sqlite:") && a.ends_with("/anna.db"), "{a}");
        let path = std::path::PathBuf::from(a.trim_start_matches("sqlite:"));
        assert!(path.parent().is_some_and(|dir| !dir.exists()), "{a}");
    }
}
