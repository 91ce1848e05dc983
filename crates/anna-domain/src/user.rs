//! The User aggregate: registration, e-mail verification and password reset.

use time::{Duration, OffsetDateTime};
use unicode_normalization::UnicodeNormalization;
use uuid::Uuid;

use crate::InvalidArgument;
use crate::events::{self, DomainEvent};
use crate::secrets::{self, Sealer, SecretHasher};

/// Purposes bound into the keyed hashes of the user's secrets.
pub const PURPOSE_VERIFICATION_CODE: &str = "user.verification.code";
pub const PURPOSE_VERIFICATION_TOKEN: &str = "user.verification.token";
pub const PURPOSE_PASSWORD_RESET: &str = "user.password_reset.token";

/// A normalised e-mail address, the form in which accounts are told apart:
/// - control characters (C0, DEL, C1) and invisible characters (Unicode's default-ignorable
///   code points: zero-width spaces and joiners, bidi controls, variation selectors, the BOM…)
///   are refused, never stored;
/// - the text is NFKC-normalised (compatibility forms such as fullwidth `ａ` become `a`), trimmed
///   and lower-cased;
/// - the local part (before `@`) must be ASCII: look-alike letters from other scripts (Cyrillic
///   `а` for Latin `a`) would otherwise make a second account that reads the same, and few mail
///   systems deliver to non-ASCII local parts anyway;
/// - the domain is converted to its ASCII (IDNA, punycode) form, so one domain has one spelling;
/// - the shape is the predecessor's `local@host.tld` with no whitespace, at most 254 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

impl Email {
    pub const MAX_LEN: usize = 254;

    pub fn parse(raw: &str) -> Result<Self, InvalidArgument> {
        let refused =
            |why: &str| InvalidArgument(format!("<UserEmail> does not allow the value <{}>{why}", excerpt(raw.trim())));
        // Surrounding whitespace (a pasted newline) is trimmed, as it always was; anything
        // invisible or controlling inside is refused.
        if let Some(c) = raw.trim().chars().find(|c| is_control(*c)) {
            return Err(refused(&format!(": control character U+{:04X}", u32::from(c))));
        }
        if let Some(c) = raw.trim().chars().find(|c| is_default_ignorable(*c)) {
            return Err(refused(&format!(": invisible character U+{:04X}", u32::from(c))));
        }
        let normalised: String = raw.trim().nfkc().collect::<String>().to_lowercase();
        if !is_email_shaped(&normalised) {
            return Err(refused(""));
        }
        let Some((local, domain)) = normalised.split_once('@') else { return Err(refused("")) };
        if !local.is_ascii() {
            return Err(refused(": the part before @ must be ASCII"));
        }
        let domain = idna::domain_to_ascii(domain).map_err(|_| refused(": the domain is not a valid domain name"))?;
        let email = format!("{local}@{domain}");
        if email.len() > Self::MAX_LEN || !is_email_shaped(&email) {
            return Err(refused(""));
        }
        Ok(Self(email))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The predecessor's rule `^[^\s@]+@[^\s@]+\.[^\s@]+$`.
fn is_email_shaped(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else { return false };
    let clean = |p: &str| !p.is_empty() && !p.chars().any(|c| c.is_whitespace() || c == '@');
    let Some((host, tld)) = domain.rsplit_once('.') else { return false };
    clean(local) && clean(domain) && !host.is_empty() && !tld.is_empty() && !host.chars().any(char::is_whitespace)
}

/// C0 controls (NUL included), DEL and C1 controls: never part of a name or an address, and
/// Postgres cannot even store NUL in text.
pub fn is_control(c: char) -> bool {
    matches!(u32::from(c), 0x00..=0x1F | 0x7F..=0x9F)
}

/// Unicode's Default_Ignorable_Code_Point property (DerivedCoreProperties.txt): characters
/// that render as nothing.
pub fn is_default_ignorable(c: char) -> bool {
    matches!(
        u32::from(c),
        0x00AD
            | 0x034F
            | 0x061C
            | 0x115F..=0x1160
            | 0x17B4..=0x17B5
            | 0x180B..=0x180F
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x206F
            | 0x3164
            | 0xFE00..=0xFE0F
            | 0xFEFF
            | 0xFFA0
            | 0xFFF0..=0xFFF8
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0000..=0xE0FFF
    )
}

/// At most the first 64 characters of attacker-controlled text, control and invisible
/// characters shown as `?`, for error messages and logs that quote the input.
pub fn excerpt(raw: &str) -> String {
    const MAX_CHARS: usize = 64;
    let mut shown: String =
        raw.chars().take(MAX_CHARS).map(|c| if is_control(c) || is_default_ignorable(c) { '?' } else { c }).collect();
    if raw.chars().nth(MAX_CHARS).is_some() {
        shown.push('…');
    }
    shown
}

/// A display name: not blank, at most 200 characters, no control characters, stored trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserName(String);

impl UserName {
    pub const MAX_CHARS: usize = 200;

    pub fn parse(raw: &str) -> Result<Self, InvalidArgument> {
        let trimmed = raw.trim();
        let refused =
            |why: &str| InvalidArgument(format!("<UserName> does not allow the value <{}>{why}", excerpt(trimmed)));
        if let Some(c) = trimmed.chars().find(|c| is_control(*c)) {
            return Err(refused(&format!(": control character U+{:04X}", u32::from(c))));
        }
        // Blank counts what shows: a name of zero-width characters alone is blank.
        let visible = trimmed.chars().any(|c| !c.is_whitespace() && !is_default_ignorable(c));
        if !visible || trimmed.chars().count() > Self::MAX_CHARS {
            return Err(refused(""));
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserStatus {
    PendingVerification,
    Active,
    Invited,
    Suspended,
    Deleted,
}

impl UserStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PendingVerification => "pending_verification",
            Self::Active => "active",
            Self::Invited => "invited",
            Self::Suspended => "suspended",
            Self::Deleted => "deleted",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, InvalidArgument> {
        Ok(match raw {
            "pending_verification" => Self::PendingVerification,
            "active" => Self::Active,
            "invited" => Self::Invited,
            "suspended" => Self::Suspended,
            "deleted" => Self::Deleted,
            other => return Err(InvalidArgument(format!("<UserStatus> does not allow the value <{other}>"))),
        })
    }
}

/// The user aggregate as stored. Secret fields hold keyed hashes, never the secrets.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub id: Uuid,
    pub name: String,
    pub email: String,
    pub status: UserStatus,
    pub password_hash: String,
    /// Keyed hash of the verification link token.
    pub verification_token: Option<String>,
    /// Keyed hash of the six-digit verification code.
    pub verification_code: Option<String>,
    pub verification_token_expires_at: Option<OffsetDateTime>,
    pub verification_attempts: i32,
    pub verified_at: Option<OffsetDateTime>,
    /// Keyed hash of the password-reset token.
    pub password_reset_token: Option<String>,
    pub password_reset_token_expires_at: Option<OffsetDateTime>,
    pub password_reset_attempts: i32,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub last_login_at: Option<OffsetDateTime>,
    /// The generation of the user's access tokens: a token issued under an older one is
    /// refused. Moves on when the user logs out everywhere or resets the password.
    pub token_generation: i64,
}

/// Secrets handed out once, in clear, to be delivered by e-mail. They are never stored.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedVerification {
    pub token: String,
    pub code: String,
    pub expires_at: OffsetDateTime,
}

impl std::fmt::Debug for IssuedVerification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedVerification").field("expires_at", &self.expires_at).finish_non_exhaustive()
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct IssuedPasswordReset {
    pub token: String,
    pub expires_at: OffsetDateTime,
}

impl std::fmt::Debug for IssuedPasswordReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedPasswordReset").field("expires_at", &self.expires_at).finish_non_exhaustive()
    }
}

/// Why a verification attempt was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("User {0} is already verified")]
    AlreadyVerified(Uuid),
    #[error("User {0} cannot perform verification")]
    NotVerifiable(Uuid),
    #[error("Verification token does not match for user {0}")]
    Mismatch(Uuid),
    #[error("Verification token for user {id} expired at {expired_at}")]
    Expired { id: Uuid, expired_at: String },
    #[error("Too many wrong verification attempts for user {0}: request a new code")]
    AttemptsExhausted(Uuid),
}

/// Why a password-reset confirmation was refused. Deliberately one message for all cases.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid password reset request")]
pub struct ResetRefused;

/// Limits that the aggregate enforces.
#[derive(Debug, Clone, Copy)]
pub struct SecretPolicy {
    pub verification_ttl: Duration,
    pub password_reset_ttl: Duration,
    pub max_attempts: i32,
}

impl Default for SecretPolicy {
    fn default() -> Self {
        Self { verification_ttl: Duration::hours(1), password_reset_ttl: Duration::hours(1), max_attempts: 5 }
    }
}

impl User {
    /// A new account in `pending_verification`, with its first verification secrets.
    pub fn register(
        name: UserName,
        email: Email,
        password_hash: String,
        now: OffsetDateTime,
        policy: &SecretPolicy,
        hasher: &SecretHasher,
        sealer: &Sealer,
    ) -> (Self, IssuedVerification, Vec<DomainEvent>) {
        let mut user = Self {
            id: Uuid::new_v4(),
            name: name.0,
            email: email.0,
            status: UserStatus::PendingVerification,
            password_hash,
            verification_token: None,
            verification_code: None,
            verification_token_expires_at: None,
            verification_attempts: 0,
            verified_at: None,
            password_reset_token: None,
            password_reset_token_expires_at: None,
            password_reset_attempts: 0,
            created_at: now,
            updated_at: now,
            last_login_at: None,
            token_generation: 0,
        };
        let issued = user.new_verification(now, policy, hasher);
        let events = vec![
            events::user_registered(&user, now),
            events::user_verification_token_issued(&user, &issued, "register", now, sealer),
        ];
        (user, issued, events)
    }

    fn new_verification(
        &mut self,
        now: OffsetDateTime,
        policy: &SecretPolicy,
        hasher: &SecretHasher,
    ) -> IssuedVerification {
        let issued = IssuedVerification {
            token: secrets::random_token(),
            code: secrets::random_code(),
            expires_at: now + policy.verification_ttl,
        };
        let owner = self.id.to_string();
        self.verification_token = Some(hasher.hash(PURPOSE_VERIFICATION_TOKEN, &owner, &issued.token));
        self.verification_code = Some(hasher.hash(PURPOSE_VERIFICATION_CODE, &owner, &issued.code));
        self.verification_token_expires_at = Some(issued.expires_at);
        self.verification_attempts = 0;
        self.updated_at = now;
        issued
    }

    /// New verification secrets (the old ones stop working). `None` when the account is not
    /// waiting for verification: the caller answers the same either way.
    pub fn reissue_verification(
        &mut self,
        now: OffsetDateTime,
        policy: &SecretPolicy,
        hasher: &SecretHasher,
        sealer: &Sealer,
    ) -> Option<(IssuedVerification, DomainEvent)> {
        if self.status != UserStatus::PendingVerification {
            return None;
        }
        let issued = self.new_verification(now, policy, hasher);
        let event = events::user_verification_token_issued(self, &issued, "resend", now, sealer);
        Some((issued, event))
    }

    /// Checks a link token or a six-digit code. A wrong value counts as an attempt; the last
    /// allowed wrong attempt voids the secrets. The caller must persist `self` whatever the
    /// result, so the attempt counter sticks.
    pub fn verify(
        &mut self,
        candidate: &str,
        now: OffsetDateTime,
        policy: &SecretPolicy,
        hasher: &SecretHasher,
    ) -> Result<DomainEvent, VerifyError> {
        match self.status {
            UserStatus::PendingVerification => {}
            UserStatus::Active => return Err(VerifyError::AlreadyVerified(self.id)),
            _ => return Err(VerifyError::NotVerifiable(self.id)),
        }
        let (Some(token_hash), Some(code_hash), Some(expires_at)) =
            (&self.verification_token, &self.verification_code, self.verification_token_expires_at)
        else {
            return Err(VerifyError::AttemptsExhausted(self.id));
        };
        let owner = self.id.to_string();
        let candidate = candidate.trim();
        let matched = hasher.matches(PURPOSE_VERIFICATION_TOKEN, &owner, candidate, token_hash)
            | hasher.matches(PURPOSE_VERIFICATION_CODE, &owner, candidate, code_hash);
        if !matched {
            self.verification_attempts += 1;
            self.updated_at = now;
            if self.verification_attempts >= policy.max_attempts {
                self.verification_token = None;
                self.verification_code = None;
                self.verification_token_expires_at = None;
                return Err(VerifyError::AttemptsExhausted(self.id));
            }
            return Err(VerifyError::Mismatch(self.id));
        }
        if now > expires_at {
            return Err(VerifyError::Expired { id: self.id, expired_at: iso(expires_at) });
        }
        self.status = UserStatus::Active;
        self.verified_at = Some(now);
        self.verification_token = None;
        self.verification_code = None;
        self.verification_token_expires_at = None;
        self.verification_attempts = 0;
        self.password_reset_token = None;
        self.password_reset_token_expires_at = None;
        self.password_reset_attempts = 0;
        self.updated_at = now;
        Ok(events::user_verified(self, now))
    }

    /// A new reset token for an active account (any earlier one stops working). `None` for
    /// other statuses: the caller answers the same either way.
    pub fn request_password_reset(
        &mut self,
        now: OffsetDateTime,
        policy: &SecretPolicy,
        hasher: &SecretHasher,
        sealer: &Sealer,
    ) -> Option<(IssuedPasswordReset, DomainEvent)> {
        if self.status != UserStatus::Active {
            return None;
        }
        let issued =
            IssuedPasswordReset { token: secrets::random_token(), expires_at: now + policy.password_reset_ttl };
        self.password_reset_token = Some(hasher.hash(PURPOSE_PASSWORD_RESET, &self.id.to_string(), &issued.token));
        self.password_reset_token_expires_at = Some(issued.expires_at);
        self.password_reset_attempts = 0;
        self.updated_at = now;
        let event = events::user_password_reset_requested(self, &issued, now, sealer);
        Some((issued, event))
    }

    /// Checks a reset token. Counts wrong attempts like `verify`; the caller persists `self`
    /// whatever the result and hashes the new password only after this succeeded.
    pub fn check_password_reset(
        &mut self,
        candidate: &str,
        now: OffsetDateTime,
        policy: &SecretPolicy,
        hasher: &SecretHasher,
    ) -> Result<(), ResetRefused> {
        if self.status != UserStatus::Active {
            return Err(ResetRefused);
        }
        let (Some(stored), Some(expires_at)) = (&self.password_reset_token, self.password_reset_token_expires_at)
        else {
            return Err(ResetRefused);
        };
        if !hasher.matches(PURPOSE_PASSWORD_RESET, &self.id.to_string(), candidate.trim(), stored) {
            self.password_reset_attempts += 1;
            self.updated_at = now;
            if self.password_reset_attempts >= policy.max_attempts {
                self.password_reset_token = None;
                self.password_reset_token_expires_at = None;
            }
            return Err(ResetRefused);
        }
        if now > expires_at {
            return Err(ResetRefused);
        }
        Ok(())
    }

    /// Sets the new password after `check_password_reset` succeeded.
    pub fn complete_password_reset(&mut self, new_password_hash: String, now: OffsetDateTime) -> DomainEvent {
        self.password_hash = new_password_hash;
        self.password_reset_token = None;
        self.password_reset_token_expires_at = None;
        self.password_reset_attempts = 0;
        self.revoke_access_tokens(now);
        events::user_password_reset_completed(self, now)
    }

    /// Every access token issued until now stops working: the next ones carry the new
    /// generation.
    pub fn revoke_access_tokens(&mut self, now: OffsetDateTime) {
        self.token_generation = self.token_generation.saturating_add(1);
        self.updated_at = now;
    }

    /// Whether an access token issued under `generation` is still good for this user.
    pub fn accepts_access_token(&self, generation: i64) -> bool {
        self.status == UserStatus::Active && generation == self.token_generation
    }

    pub fn record_login(&mut self, now: OffsetDateTime) {
        self.last_login_at = Some(now);
        self.updated_at = now;
    }
}

/// ISO-8601 with milliseconds and `Z`, as the predecessor wrote timestamps.
pub fn iso(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer::from_server_secret(b"test")
    }

    fn setup() -> (User, IssuedVerification, SecretPolicy, SecretHasher, OffsetDateTime) {
        let hasher = SecretHasher::from_server_secret(b"test");
        let policy = SecretPolicy::default();
        let now = OffsetDateTime::now_utc();
        let (user, issued, events) = User::register(
            UserName::parse(" Ann ").unwrap_or_else(|e| panic!("{e}")),
            Email::parse(" Ann@Example.COM ").unwrap_or_else(|e| panic!("{e}")),
            "phc".into(),
            now,
            &policy,
            &hasher,
            &sealer(),
        );
        assert_eq!(events.len(), 2);
        (user, issued, policy, hasher, now)
    }

    #[test]
    fn email_is_normalised_and_validated() {
        assert_eq!(Email::parse("  A@B.Co ").map(|e| e.0), Ok("a@b.co".into()));
        assert_eq!(Email::parse("a@b.co\n").map(|e| e.0), Ok("a@b.co".into()), "a pasted newline is trimmed");
        for bad in ["", "a", "a@b", "a b@c.d", "a@@b.c", "@b.c", "a@.c", "a@b."] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Email::parse("foo").err().map(|e| e.0), Some("<UserEmail> does not allow the value <foo>".into()));
    }

    #[test]
    fn email_refuses_what_hides_or_breaks() {
        for bad in ["a\0b@c.de", "ab@c.de\0", "a\u{1}b@c.de", "a\u{7f}@c.de", "a\u{85}@c.de"] {
            let error = Email::parse(bad).err().map(|e| e.0).unwrap_or_default();
            assert!(error.contains("control character"), "{bad:?}: {error}");
            assert!(!error.contains('\0'), "the refusal does not echo the control character");
        }
        for bad in [
            "a\u{200b}lice@example.com",
            "alice@exa\u{200d}mple.com",
            "\u{feff}alice@example.com",
            "alice\u{ad}@example.com",
        ] {
            let error = Email::parse(bad).err().map(|e| e.0).unwrap_or_default();
            assert!(error.contains("invisible character"), "{bad:?}: {error}");
        }
        // Look-alikes from other scripts in the local part are refused…
        assert!(Email::parse("\u{430}lice@example.com").is_err(), "Cyrillic a");
        assert!(Email::parse("\u{130}lice@example.com").is_err(), "dotted capital I");
        // …compatibility forms fold onto the ASCII account…
        assert_eq!(Email::parse("\u{ff41}lice@example.com").map(|e| e.0), Ok("alice@example.com".into()));
        assert_eq!(Email::parse("alice@\u{ff45}xample.com").map(|e| e.0), Ok("alice@example.com".into()));
        // …and a non-ASCII domain gets its one ASCII spelling.
        assert_eq!(Email::parse("alice@b\u{fc}cher.de").map(|e| e.0), Ok("alice@xn--bcher-kva.de".into()));
        assert_eq!(Email::parse("alice@B\u{dc}CHER.de").map(|e| e.0), Ok("alice@xn--bcher-kva.de".into()));
        assert_eq!(Email::parse("alice@ex\u{430}mple.com").map(|e| e.0), Ok("alice@xn--exmple-4nf.com".into()));
        // The refusal quotes a short excerpt, not the whole input.
        let long = format!("{}@", "x".repeat(10_000));
        let error = Email::parse(&long).err().map(|e| e.0).unwrap_or_default();
        assert!(error.len() < 200, "{} bytes", error.len());
    }

    #[test]
    fn names_refuse_control_characters() {
        assert!(UserName::parse("\u{200b}\u{3164}").is_err(), "invisible only is blank");
        assert!(UserName::parse("Ada\0Lovelace").is_err());
        assert!(UserName::parse("Ada\u{1b}[31m").is_err());
        assert_eq!(UserName::parse(" Ada Lovelace ").map(|n| n.0), Ok("Ada Lovelace".into()));
        assert!(UserName::parse(&"x".repeat(201)).err().is_some_and(|e| e.0.len() < 200));
    }

    #[test]
    fn register_stores_only_hashes() {
        let (user, issued, ..) = setup();
        assert_eq!(user.name, "Ann");
        assert_eq!(user.email, "ann@example.com");
        assert_eq!(user.status, UserStatus::PendingVerification);
        assert_ne!(user.verification_code.as_deref(), Some(issued.code.as_str()));
        assert_ne!(user.verification_token.as_deref(), Some(issued.token.as_str()));
    }

    #[test]
    fn verify_by_code_or_token() {
        let (mut user, issued, policy, hasher, now) = setup();
        let mut other = user.clone();
        assert!(user.verify(&issued.code, now, &policy, &hasher).is_ok());
        assert_eq!(user.status, UserStatus::Active);
        assert!(matches!(user.verify(&issued.code, now, &policy, &hasher), Err(VerifyError::AlreadyVerified(_))));
        assert!(other.verify(&format!(" {} ", issued.token), now, &policy, &hasher).is_ok());
    }

    #[test]
    fn fifth_wrong_attempt_voids_the_code() {
        let (mut user, issued, policy, hasher, now) = setup();
        for _ in 0..4 {
            assert!(matches!(user.verify("000000x", now, &policy, &hasher), Err(VerifyError::Mismatch(_))));
        }
        assert!(matches!(user.verify("000000x", now, &policy, &hasher), Err(VerifyError::AttemptsExhausted(_))));
        assert!(matches!(user.verify(&issued.code, now, &policy, &hasher), Err(VerifyError::AttemptsExhausted(_))));
        let (again, _) =
            user.reissue_verification(now, &policy, &hasher, &sealer()).unwrap_or_else(|| panic!("reissue"));
        assert!(user.verify(&again.code, now, &policy, &hasher).is_ok());
    }

    #[test]
    fn expired_code_is_refused() {
        let (mut user, issued, policy, hasher, now) = setup();
        let later = now + Duration::hours(2);
        assert!(matches!(user.verify(&issued.code, later, &policy, &hasher), Err(VerifyError::Expired { .. })));
    }

    #[test]
    fn password_reset_flow() {
        let (mut user, issued, policy, hasher, now) = setup();
        assert!(user.request_password_reset(now, &policy, &hasher, &sealer()).is_none());
        user.verify(&issued.code, now, &policy, &hasher).unwrap_or_else(|e| panic!("{e}"));
        let (reset, _) =
            user.request_password_reset(now, &policy, &hasher, &sealer()).unwrap_or_else(|| panic!("reset"));
        assert!(user.check_password_reset("nope", now, &policy, &hasher).is_err());
        assert!(user.check_password_reset(&reset.token, now + Duration::hours(2), &policy, &hasher).is_err());
        assert!(user.check_password_reset(&reset.token, now, &policy, &hasher).is_ok());
        assert!(user.accepts_access_token(0));
        user.complete_password_reset("new".into(), now);
        assert_eq!(user.password_hash, "new");
        assert!(user.check_password_reset(&reset.token, now, &policy, &hasher).is_err());
        // Access tokens issued before the reset are refused.
        assert!(!user.accepts_access_token(0));
        assert!(user.accepts_access_token(1));
    }

    #[test]
    fn access_tokens_are_accepted_from_active_users_of_the_current_generation() {
        let (mut user, issued, policy, hasher, now) = setup();
        assert!(!user.accepts_access_token(0), "not verified yet");
        user.verify(&issued.code, now, &policy, &hasher).unwrap_or_else(|e| panic!("{e}"));
        assert!(user.accepts_access_token(0));
        user.revoke_access_tokens(now);
        user.revoke_access_tokens(now);
        assert!(!user.accepts_access_token(0) && !user.accepts_access_token(1));
        assert!(user.accepts_access_token(2));
    }

    #[test]
    fn events_carry_secrets_only_sealed() {
        let hasher = SecretHasher::from_server_secret(b"test");
        let now = OffsetDateTime::now_utc();
        let name = UserName::parse("Ann").unwrap_or_else(|e| panic!("{e}"));
        let email = Email::parse("ann@example.com").unwrap_or_else(|e| panic!("{e}"));
        let (_, issued, events) =
            User::register(name, email, "phc".into(), now, &SecretPolicy::default(), &hasher, &sealer());
        let issued_event = &events[1];
        let text = issued_event.payload.to_string();
        assert!(!text.contains(&issued.code) && !text.contains(&issued.token));
        let opened: crate::events::VerificationSecrets =
            crate::events::open_secrets(issued_event, &sealer()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((opened.code, opened.token), (issued.code, issued.token));
        let other = Sealer::from_server_secret(b"other");
        assert!(crate::events::open_secrets::<crate::events::VerificationSecrets>(issued_event, &other).is_err());
    }

    #[test]
    fn iso_format() {
        let at = time::macros::datetime!(2026-01-03 04:05:06.789 UTC);
        assert_eq!(iso(at), "2026-01-03T04:05:06.789Z");
    }
}
