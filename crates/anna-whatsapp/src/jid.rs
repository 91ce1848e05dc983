//! WhatsApp addresses (JIDs): `<digits>@s.whatsapp.net` for a person, `<id>@g.us` for a group,
//! `<id>@lid` for a person known by a hidden id. Tenants may write a phone number instead
//! (international format, with spaces, dashes, dots, brackets or a leading `+`), which becomes
//! the person's JID.

use std::fmt;

pub const USER_SERVER: &str = "s.whatsapp.net";
pub const GROUP_SERVER: &str = "g.us";
pub const LID_SERVER: &str = "lid";

/// E.164 allows 15 digits; the shortest numbers in use have 7 (country code included).
const PHONE_DIGITS: std::ops::RangeInclusive<usize> = 7..=15;
const MAX_ID_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Jid {
    user: String,
    server: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JidError {
    #[error("is empty")]
    Empty,
    #[error("must be a phone number in international format (7 to 15 digits, country code first) or a WhatsApp JID")]
    NotAPhoneNumber,
    #[error("has an unknown WhatsApp server {0:?} (expected s.whatsapp.net, g.us or lid)")]
    UnknownServer(String),
    #[error("has an invalid user part")]
    InvalidUser,
}

impl Jid {
    /// A person's JID from a phone number or any accepted JID form.
    pub fn parse(input: &str) -> Result<Self, JidError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(JidError::Empty);
        }
        match input.split_once('@') {
            Some((user, server)) => Self::from_parts(user, server),
            None => Self::phone(input),
        }
    }

    /// A phone number in international format: digits with optional `+`, spaces, dashes, dots
    /// and brackets.
    pub fn phone(input: &str) -> Result<Self, JidError> {
        let digits = phone_digits(input)?;
        Ok(Self { user: digits, server: USER_SERVER })
    }

    fn from_parts(user: &str, server: &str) -> Result<Self, JidError> {
        let server = match server.to_ascii_lowercase().as_str() {
            USER_SERVER | "c.us" => USER_SERVER,
            GROUP_SERVER => GROUP_SERVER,
            LID_SERVER => LID_SERVER,
            other => return Err(JidError::UnknownServer(other.chars().take(32).collect())),
        };
        // `<digits>:<device>@s.whatsapp.net` addresses one device; messages go to the account.
        let user = user.split_once(':').map_or(user, |(account, _device)| account);
        let valid = match server {
            USER_SERVER => user.bytes().all(|b| b.is_ascii_digit()) && PHONE_DIGITS.contains(&user.len()),
            GROUP_SERVER => {
                !user.is_empty()
                    && user.len() <= MAX_ID_LEN
                    && user.bytes().all(|b| b.is_ascii_digit() || b == b'-')
                    && !user.starts_with('-')
            }
            _ => !user.is_empty() && user.len() <= MAX_ID_LEN && user.bytes().all(|b| b.is_ascii_digit()),
        };
        if !valid {
            return Err(JidError::InvalidUser);
        }
        Ok(Self { user: user.to_owned(), server })
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn server(&self) -> &'static str {
        self.server
    }

    pub fn is_group(&self) -> bool {
        self.server == GROUP_SERVER
    }
}

impl fmt::Display for Jid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.user, self.server)
    }
}

/// The digits of a phone number written in international format.
pub fn phone_digits(input: &str) -> Result<String, JidError> {
    let input = input.trim();
    if input.is_empty() {
        return Err(JidError::Empty);
    }
    let body = input.strip_prefix('+').unwrap_or(input);
    let mut digits = String::with_capacity(body.len());
    for c in body.chars() {
        match c {
            '0'..='9' => digits.push(c),
            ' ' | '-' | '.' | '(' | ')' => {}
            _ => return Err(JidError::NotAPhoneNumber),
        }
    }
    // A national number with a trunk prefix (0…) is not international.
    if !PHONE_DIGITS.contains(&digits.len()) || digits.starts_with('0') {
        return Err(JidError::NotAPhoneNumber);
    }
    Ok(digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_numbers_become_person_jids() {
        for input in ["+49 151 2345-6789", "4915123456789", "+49 (151) 23.45.67.89", " +4915123456789 "] {
            assert_eq!(Jid::parse(input).map(|j| j.to_string()), Ok("4915123456789@s.whatsapp.net".into()), "{input}");
        }
    }

    #[test]
    fn jids_are_normalised() {
        assert_eq!(Jid::parse("4915123456789@c.us").map(|j| j.to_string()), Ok("4915123456789@s.whatsapp.net".into()));
        assert_eq!(
            Jid::parse("4915123456789:12@S.WhatsApp.net").map(|j| j.to_string()),
            Ok("4915123456789@s.whatsapp.net".into())
        );
        assert_eq!(Jid::parse("120363025246125486@g.us").map(|j| j.is_group()), Ok(true));
        assert_eq!(Jid::parse("1234567890123@lid").map(|j| j.server()), Ok(LID_SERVER));
    }

    #[test]
    fn bad_addresses_are_refused() {
        assert_eq!(Jid::parse(""), Err(JidError::Empty));
        assert_eq!(Jid::parse("0151 2345678"), Err(JidError::NotAPhoneNumber));
        assert_eq!(Jid::parse("12345"), Err(JidError::NotAPhoneNumber));
        assert_eq!(Jid::parse("+1 555 CALL NOW"), Err(JidError::NotAPhoneNumber));
        assert_eq!(Jid::parse("1234567890123456"), Err(JidError::NotAPhoneNumber));
        assert!(matches!(Jid::parse("123@example.com"), Err(JidError::UnknownServer(_))));
        assert_eq!(Jid::parse("abc@s.whatsapp.net"), Err(JidError::InvalidUser));
        assert_eq!(Jid::parse("@g.us"), Err(JidError::InvalidUser));
    }
}
