//! Reading variables: one parser per kind of value, each error naming the variable and what it
//! expects, and a record of every name read (docs/configuration.md is checked
//! against it).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;

use super::ConfigError;

/// Reads variables through a lookup function, so tests need not touch the process env.
pub struct Vars<F: Fn(&str) -> Option<String>> {
    lookup: F,
    read: RefCell<BTreeSet<String>>,
}

impl<F: Fn(&str) -> Option<String>> Vars<F> {
    pub fn new(lookup: F) -> Self {
        Self { lookup, read: RefCell::new(BTreeSet::new()) }
    }

    /// Every variable name looked up so far.
    pub fn names_read(&self) -> BTreeSet<String> {
        self.read.borrow().clone()
    }

    /// The value, or `None` when unset or blank.
    pub(super) fn get(&self, var: &str) -> Option<String> {
        self.read.borrow_mut().insert(var.to_owned());
        (self.lookup)(var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
    }

    pub(super) fn string(&self, var: &str, default: &str) -> String {
        self.get(var).unwrap_or_else(|| default.to_owned())
    }

    pub(super) fn parse<T: FromStr>(
        &self,
        var: &'static str,
        default: T,
        expected: &'static str,
    ) -> Result<T, ConfigError> {
        match self.get(var) {
            None => Ok(default),
            Some(raw) => raw.parse().map_err(|_| ConfigError::Invalid { var, shown: format!("{raw:?}"), expected }),
        }
    }

    pub(super) fn positive<T: FromStr + PartialOrd + Default>(
        &self,
        var: &'static str,
        default: T,
        expected: &'static str,
    ) -> Result<T, ConfigError> {
        let value = self.parse(var, default, expected)?;
        if value <= T::default() {
            return Err(ConfigError::Invalid {
                var,
                shown: format!("{:?}", self.get(var).unwrap_or_default()),
                expected,
            });
        }
        Ok(value)
    }

    /// A positive duration in milliseconds, at most ten years (so timestamp arithmetic never
    /// overflows).
    pub(super) fn millis(&self, var: &'static str, default_ms: u64) -> Result<Duration, ConfigError> {
        const MAX_MS: u64 = 10 * 365 * 24 * 3_600_000;
        let expected = "a positive number of milliseconds (at most ten years)";
        let ms = self.positive(var, default_ms, expected)?;
        if ms > MAX_MS {
            return Err(ConfigError::Invalid { var, shown: ms.to_string(), expected });
        }
        Ok(Duration::from_millis(ms))
    }

    /// A duration in milliseconds that may be zero.
    pub(super) fn millis_or_zero(&self, var: &'static str, default_ms: u64) -> Result<Duration, ConfigError> {
        Ok(Duration::from_millis(self.parse(var, default_ms, "a number of milliseconds (0 or more)")?))
    }

    pub(super) fn boolean(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(var).map(|v| v.to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if matches!(v.as_str(), "true" | "1" | "yes" | "on") => Ok(true),
            Some(v) if matches!(v.as_str(), "false" | "0" | "no" | "off") => Ok(false),
            Some(v) => Err(ConfigError::Invalid { var, shown: format!("{v:?}"), expected: "true or false" }),
        }
    }

    /// A secret: held so that it never prints, and never shown in errors.
    pub(super) fn secret(&self, var: &str) -> Option<SecretString> {
        self.get(var).map(SecretString::from)
    }
}
