//! The store-login decision: which name, which mechanism and which secret popgate sends a store for a
//! client, and the APOP and CRAM-MD5 digests popgate checks itself. No I/O: it is a function of the
//! tenant's rules and the client's credentials, tested case by case below.

use std::collections::HashMap;

use crate::config::StoreLogin;
use crate::secret::Secret;
use crate::session::{Credentials, Mechanism};
use crate::store::connection::StoreAuth;

/// What to send the store, owning what it needs (a secret looked up, a master login name built).
#[derive(Debug)]
pub enum OwnedAuth {
    Password {
        user: String,
        password: Secret,
        authzid: Option<String>,
        plain: bool,
    },
    Apop {
        user: String,
        digest: String,
    },
    Secret {
        user: String,
        secret: Secret,
    },
    Sasl {
        mechanism: &'static str,
        initial: Secret,
    },
}

impl OwnedAuth {
    pub fn as_store_auth(&self) -> StoreAuth<'_> {
        match self {
            OwnedAuth::Password {
                user,
                password,
                authzid,
                plain,
            } => StoreAuth::Password {
                user,
                password,
                authzid: authzid.as_deref(),
                plain: *plain,
            },
            OwnedAuth::Apop { user, digest } => StoreAuth::ApopPassthrough { user, digest },
            OwnedAuth::Secret { user, secret } => StoreAuth::Secret { user, secret },
            OwnedAuth::Sasl { mechanism, initial } => StoreAuth::Sasl {
                mechanism,
                initial: initial.expose(),
            },
        }
    }
}

/// The client's digest or password did not check out against the tenant's secrets (or no secret is
/// known for the mailbox) where popgate must check it itself: a failed login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the client's credentials did not check out")]
pub struct NotChecked;

/// What a tenant says about logging in at its stores.
#[derive(Debug, Clone, Copy)]
pub struct LoginRules<'a> {
    /// `mailbox → secret`, when the tenant has a secrets source.
    pub secrets: Option<&'a HashMap<String, Secret>>,
    /// How popgate logs in at the tenant's stores.
    pub backend_login: &'a StoreLogin,
}

/// Decides how to log the client in at the store. APOP and CRAM-MD5 digests are checked here against the
/// tenant's secrets (Err when they do not match or no secret is known), unless APOP goes to the store the
/// client saw greeting it. Whenever popgate itself checked the client's secret (a digest, or a master
/// login), the store is asked for `checked_user`, the normalised mailbox whose secret that was, never the
/// name as typed: on a store that tells case or Unicode forms apart, the name as typed may be another
/// account.
pub fn store_auth(
    rules: LoginRules<'_>,
    creds: &Credentials,
    store_user: &str,
    checked_user: impl FnOnce() -> String,
    mailbox_key: &str,
    passthrough: bool,
) -> Result<OwnedAuth, NotChecked> {
    let secret = || rules.secrets.and_then(|s| s.get(mailbox_key)).cloned();
    let verified_secret = match creds.mechanism {
        Mechanism::Apop if passthrough => {
            return Ok(OwnedAuth::Apop {
                user: store_user.to_string(),
                digest: String::from_utf8_lossy(creds.password.expose()).into_owned(),
            });
        }
        Mechanism::Apop | Mechanism::CramMd5 => {
            let (secret, challenge) = (
                secret().ok_or(NotChecked)?,
                creds.challenge.as_deref().ok_or(NotChecked)?,
            );
            let expected = if creds.mechanism == Mechanism::Apop {
                crate::protocol::sasl::apop_digest(challenge, secret.expose())
            } else {
                crate::protocol::sasl::cram_md5_digest(challenge, secret.expose())
            };
            let presented = String::from_utf8_lossy(creds.password.expose()).into_owned();
            if !crate::protocol::sasl::digests_match(&expected, &presented) {
                return Err(NotChecked);
            }
            Some(secret)
        }
        _ => None,
    };
    if let StoreLogin::Master(master) = rules.backend_login {
        // Only after popgate itself checked the client: a master login ignores the user's password.
        let checked = verified_secret.is_some()
            || secret().is_some_and(|s| {
                creds.mechanism.reveals_secret() && s.matches(creds.password.expose())
            });
        if !checked {
            return Err(NotChecked);
        }
        return Ok(OwnedAuth::Password {
            user: format!("{}{}{}", checked_user(), master.separator, master.user),
            password: Secret::new(master.password.expose().as_bytes().to_vec()),
            authzid: None,
            plain: false,
        });
    }
    if let Some(secret) = verified_secret {
        return Ok(OwnedAuth::Secret {
            user: checked_user(),
            secret,
        });
    }
    let sasl = |mechanism| OwnedAuth::Sasl {
        mechanism,
        initial: creds.password.clone(),
    };
    Ok(match creds.mechanism {
        Mechanism::Xoauth2 => sasl("XOAUTH2"),
        Mechanism::Oauthbearer => sasl("OAUTHBEARER"),
        Mechanism::ScramSha1 => sasl("SCRAM-SHA-1"),
        Mechanism::ScramSha256 => sasl("SCRAM-SHA-256"),
        _ => OwnedAuth::Password {
            user: store_user.to_string(),
            password: creds.password.clone(),
            authzid: creds.authzid.clone(),
            plain: password_as_plain(rules.backend_login),
        },
    })
}

/// Whether a name and password (USER/PASS, PLAIN or LOGIN from the client; or an auth_http answer's) go to
/// the store as AUTH PLAIN where it offers PLAIN: one round trip, where USER/PASS takes two. Only
/// `user_pass` keeps USER/PASS; a master login is USER/PASS by its own rule.
pub fn password_as_plain(backend_login: &StoreLogin) -> bool {
    matches!(backend_login, StoreLogin::Client | StoreLogin::AuthPlain)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands
mod tests {
    //! The store-login decision, case by case: every mechanism × `backend_login` × secrets present or
    //! not (× APOP passthrough). What must hold: popgate never logs in with a master user or a stored
    //! secret unless it checked the client itself, and then only as the mailbox it checked.

    use super::*;
    use crate::config::MasterUser;
    use crate::protocol::sasl::{apop_digest, cram_md5_digest};
    use crate::secret::SecretString;

    const CHALLENGE: &str = "<1.2@popgate>";
    const TYPED: &str = "Alice@example.com";
    const CHECKED: &str = "alice@example.com";
    const SECRET: &str = "alice-secret";

    const ALL: [Mechanism; 9] = [
        Mechanism::UserPass,
        Mechanism::Plain,
        Mechanism::Login,
        Mechanism::Apop,
        Mechanism::CramMd5,
        Mechanism::Xoauth2,
        Mechanism::Oauthbearer,
        Mechanism::ScramSha1,
        Mechanism::ScramSha256,
    ];

    fn logins() -> [StoreLogin; 4] {
        [
            StoreLogin::Client,
            StoreLogin::UserPass,
            StoreLogin::AuthPlain,
            StoreLogin::Master(MasterUser {
                user: "popmaster".into(),
                password: SecretString::new("master-pw".into()),
                separator: "*".into(),
            }),
        ]
    }

    /// What the client presents with `mechanism`: the right secret (or its digest) when `right`.
    fn creds(mechanism: Mechanism, right: bool) -> Credentials {
        let secret = if right { SECRET } else { "wrong" };
        let password = match mechanism {
            Mechanism::Apop => apop_digest(CHALLENGE, secret.as_bytes()),
            Mechanism::CramMd5 => cram_md5_digest(CHALLENGE, secret.as_bytes()),
            Mechanism::Xoauth2 | Mechanism::Oauthbearer => "dG9rZW4=".into(),
            Mechanism::ScramSha1 | Mechanism::ScramSha256 => "bixuPWFsaWNl".into(),
            _ => secret.into(),
        };
        Credentials {
            mechanism,
            login: TYPED.into(),
            authzid: None,
            password: Secret::new(password.into_bytes()),
            challenge: Some(CHALLENGE.into()),
        }
    }

    fn decide(
        mechanism: Mechanism,
        login: &StoreLogin,
        secrets: Option<&HashMap<String, Secret>>,
        right: bool,
        passthrough: bool,
    ) -> Result<OwnedAuth, NotChecked> {
        store_auth(
            LoginRules {
                secrets,
                backend_login: login,
            },
            &creds(mechanism, right),
            TYPED,
            || CHECKED.to_string(),
            CHECKED,
            passthrough,
        )
    }

    /// A readable summary of a decision, secrets left out.
    fn shape(auth: &Result<OwnedAuth, NotChecked>) -> String {
        match auth {
            Err(NotChecked) => "refused".into(),
            Ok(OwnedAuth::Password {
                user,
                plain,
                password,
                ..
            }) => {
                let pw = String::from_utf8_lossy(password.expose()).into_owned();
                format!("password user={user} plain={plain} pw={pw}")
            }
            Ok(OwnedAuth::Apop { user, .. }) => format!("apop user={user}"),
            Ok(OwnedAuth::Secret { user, secret }) => {
                format!(
                    "secret user={user} pw={}",
                    String::from_utf8_lossy(secret.expose())
                )
            }
            Ok(OwnedAuth::Sasl { mechanism, .. }) => format!("sasl {mechanism}"),
        }
    }

    #[test]
    fn every_mechanism_login_form_and_secrets_case() {
        let stored: HashMap<String, Secret> =
            [(CHECKED.to_string(), Secret::new(SECRET.as_bytes().to_vec()))].into();
        for mechanism in ALL {
            for login in logins() {
                let master = matches!(login, StoreLogin::Master(_));
                for secrets in [None, Some(&stored)] {
                    for right in [true, false] {
                        let got = shape(&decide(mechanism, &login, secrets, right, false));
                        let case = format!(
                            "{mechanism:?} {login:?} secrets={} right={right}",
                            secrets.is_some()
                        );
                        let digest = matches!(mechanism, Mechanism::Apop | Mechanism::CramMd5);
                        let relayed = matches!(
                            mechanism,
                            Mechanism::Xoauth2
                                | Mechanism::Oauthbearer
                                | Mechanism::ScramSha1
                                | Mechanism::ScramSha256
                        );
                        // popgate itself checked the client: a digest against the stored secret, or
                        // (master only) a password against it. A bearer token is no password: under a
                        // master login, OAuth mechanisms are refused.
                        let checked = secrets.is_some()
                            && right
                            && (digest || (master && mechanism.reveals_secret() && !relayed));
                        let want = if master {
                            if checked {
                                format!(
                                    "password user={CHECKED}*popmaster plain=false pw=master-pw"
                                )
                            } else {
                                "refused".into()
                            }
                        } else if digest {
                            if checked {
                                format!("secret user={CHECKED} pw={SECRET}")
                            } else {
                                "refused".into()
                            }
                        } else if relayed {
                            format!("sasl {}", mechanism.sasl_name().unwrap())
                        } else {
                            // Only `user_pass` keeps USER/PASS for a password login.
                            let plain = !matches!(login, StoreLogin::UserPass);
                            let pw = if right { SECRET } else { "wrong" };
                            format!("password user={TYPED} plain={plain} pw={pw}")
                        };
                        assert_eq!(got, want, "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn apop_passthrough_relays_the_digest_as_typed_unless_a_master_login_is_set() {
        let got = decide(Mechanism::Apop, &StoreLogin::Client, None, true, true);
        assert_eq!(shape(&got), format!("apop user={TYPED}"));
        let Ok(OwnedAuth::Apop { digest, .. }) = got else {
            panic!("not APOP")
        };
        assert_eq!(digest, apop_digest(CHALLENGE, SECRET.as_bytes()));
        // Passthrough is decided before the master rule: the store checks the digest itself.
        let master = &logins()[3];
        assert_eq!(
            shape(&decide(Mechanism::Apop, master, None, false, true)),
            format!("apop user={TYPED}")
        );
    }
}
