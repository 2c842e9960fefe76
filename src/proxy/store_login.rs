//! How popgate logs a client in at a store: the decision (which name, which mechanism, which secret; the
//! APOP and CRAM-MD5 digests popgate checks itself) and the nginx-style auth_http login. No client I/O
//! beyond the SASL round trips a store asks for.

use std::collections::HashMap;

use crate::config::BackendLogin;
use crate::secret::Secret;
use crate::session::{ClientSession, Credentials, Mechanism};
use crate::upstream::LoginError;
use crate::upstream::backend::{ClientInfo, StoreAuth};

use super::snapshot::TenantRuntime;

/// What to send the store, owning what it needs (a secret looked up, a master login name built).
pub(super) enum OwnedAuth {
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
    pub(super) fn as_store_auth(&self) -> StoreAuth<'_> {
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

/// What a tenant says about logging in at its stores.
#[derive(Debug, Clone, Copy)]
pub(super) struct LoginRules<'a> {
    /// `mailbox → secret`, when the tenant has a secrets source.
    pub(super) secrets: Option<&'a HashMap<String, Secret>>,
    /// How popgate logs in at the tenant's stores.
    pub(super) backend_login: &'a BackendLogin,
}

/// Decides how to log the client in at the store. APOP and CRAM-MD5 digests are checked here against the
/// tenant's secrets (Err when they do not match or no secret is known), unless APOP goes to the store the
/// client saw greeting it. Whenever popgate itself checked the client's secret (a digest, or a master
/// login), the store is asked for `checked_user`, the normalised mailbox whose secret that was, never the
/// name as typed: on a store that tells case or Unicode forms apart, the name as typed may be another
/// account.
pub(super) fn store_auth(
    rules: LoginRules<'_>,
    creds: &Credentials,
    backend_user: &str,
    checked_user: impl FnOnce() -> String,
    mailbox_key: &str,
    passthrough: bool,
) -> Result<OwnedAuth, ()> {
    let secret = || rules.secrets.and_then(|s| s.get(mailbox_key)).cloned();
    let verified_secret = match creds.mechanism {
        Mechanism::Apop if passthrough => {
            return Ok(OwnedAuth::Apop {
                user: backend_user.to_string(),
                digest: String::from_utf8_lossy(creds.password.expose()).into_owned(),
            });
        }
        Mechanism::Apop | Mechanism::CramMd5 => {
            let (secret, challenge) = (secret().ok_or(())?, creds.challenge.as_deref().ok_or(())?);
            let expected = if creds.mechanism == Mechanism::Apop {
                crate::protocol::sasl::apop_digest(challenge, secret.expose())
            } else {
                crate::protocol::sasl::cram_md5_digest(challenge, secret.expose())
            };
            let presented = String::from_utf8_lossy(creds.password.expose()).into_owned();
            if !crate::protocol::sasl::digests_match(&expected, &presented) {
                return Err(());
            }
            Some(secret)
        }
        _ => None,
    };
    if let BackendLogin::Master(master) = rules.backend_login {
        // Only after popgate itself checked the client: a master login ignores the user's password.
        let checked = verified_secret.is_some()
            || secret().is_some_and(|s| {
                creds.mechanism.reveals_secret() && s.matches(creds.password.expose())
            });
        if !checked {
            return Err(());
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
            user: backend_user.to_string(),
            password: creds.password.clone(),
            authzid: creds.authzid.clone(),
            plain: match rules.backend_login {
                BackendLogin::AuthPlain => true,
                BackendLogin::UserPass => false,
                _ => creds.mechanism == Mechanism::Plain,
            },
        },
    })
}

/// One auth_http login's facts.
pub(super) struct AuthHttpLogin<'a> {
    pub(super) service: &'a crate::authhttp::AuthHttp,
    /// popgate's resolver, for the store the service names.
    pub(super) discovery: &'a crate::upstream::dns::Discovery,
    pub(super) tenant: &'a TenantRuntime,
    pub(super) creds: &'a Credentials,
    pub(super) auth: &'a OwnedAuth,
    pub(super) backend_user: &'a str,
    pub(super) client: &'a ClientInfo,
    /// This connection's login attempt, from 1 (`Auth-Login-Attempt`, as nginx counts).
    pub(super) attempt: u32,
}

pub(super) enum AuthHttpOutcome {
    LoggedIn(crate::upstream::LoggedIn, String),
    /// The auth service or the store refused the credentials: a failed login.
    Refused(Vec<u8>),
    /// The store answered for now only (`[IN-USE]`, `[SYS/TEMP]`): not a failed login.
    Temporary(Vec<u8>),
    Unavailable(String),
}

/// nginx `auth_http`: the service checks the client and names the store (and possibly the name and
/// password to use there); popgate then connects and logs in as told.
pub(super) async fn auth_http_login(
    login: AuthHttpLogin<'_>,
    relay: &mut ClientSession,
) -> AuthHttpOutcome {
    let (server, port, user, pass) = match ask_service(&login).await {
        Ok(told) => told,
        Err(outcome) => return outcome,
    };
    let AuthHttpLogin {
        discovery,
        tenant,
        creds,
        auth,
        backend_user,
        client,
        ..
    } = login;
    // With popgate's own resolver (`dns:`), as the stores' names are, never the system's.
    let target = crate::upstream::dns::Target::Host {
        host: server.clone(),
        port,
    };
    let addr = match discovery.resolve(&target).await {
        Ok((endpoints, _)) if !endpoints.is_empty() => endpoints[0].addr,
        Ok(_) => {
            return AuthHttpOutcome::Unavailable(format!("Auth-Server {server} has no address"));
        }
        Err(e) => {
            return AuthHttpOutcome::Unavailable(format!(
                "cannot resolve Auth-Server {server}: {e}"
            ));
        }
    };
    let user = user.unwrap_or_else(|| backend_user.to_string());
    let store_auth = match (&pass, auth) {
        (Some(p), _) => StoreAuth::Password {
            user: &user,
            password: p,
            authzid: None,
            plain: false,
        },
        // A digest cannot be replayed to another store: nginx requires Auth-Pass for these methods.
        (None, _) if matches!(creds.mechanism, Mechanism::Apop | Mechanism::CramMd5) => {
            return AuthHttpOutcome::Unavailable(
                "auth_http gave no Auth-Pass for a digest login".into(),
            );
        }
        (None, OwnedAuth::Sasl { .. }) => auth.as_store_auth(),
        (None, _) => StoreAuth::Password {
            user: &user,
            password: &creds.password,
            authzid: None,
            plain: false,
        },
    };
    let endpoint = crate::upstream::dns::Endpoint {
        addr,
        host: server.clone(),
        priority: 0,
        weight: 1,
    };
    match tenant
        .group
        .login_direct(&endpoint, &store_auth, client, relay)
        .await
    {
        Ok(l) => AuthHttpOutcome::LoggedIn(l, format!("{server}:{port}")),
        Err(LoginError::Rejected(line)) => AuthHttpOutcome::Refused(line),
        Err(LoginError::Temporary(line)) => AuthHttpOutcome::Temporary(line),
        Err(LoginError::Unavailable(why) | LoginError::Dropped(why)) => {
            AuthHttpOutcome::Unavailable(why)
        }
    }
}

/// Where the service says to log in: `(server, port, user, password)`, or its refusal (after the wait it
/// asked for) or trouble reaching it.
async fn ask_service(
    login: &AuthHttpLogin<'_>,
) -> Result<(String, u16, Option<String>, Option<Secret>), AuthHttpOutcome> {
    let creds = login.creds;
    let method = match creds.mechanism {
        Mechanism::Apop => "apop",
        Mechanism::CramMd5 => "cram-md5",
        _ => "plain",
    };
    let request = crate::authhttp::AuthRequest {
        method,
        user: &creds.login,
        pass: creds.password.expose(),
        salt: creds.challenge.as_deref(),
        protocol: "pop3",
        attempt: login.attempt,
        client_ip: login.client.peer.ip(),
        client_host: None,
    };
    match login.service.lookup(&request).await {
        Ok(crate::authhttp::AuthAnswer::Ok {
            server,
            port,
            user,
            pass,
        }) => Ok((server, port, user, pass)),
        Ok(crate::authhttp::AuthAnswer::Refused { message, wait }) => {
            if let Some(wait) = wait {
                tokio::time::sleep(wait).await;
            }
            Err(AuthHttpOutcome::Refused(
                format!("-ERR [AUTH] {message}\r\n").into_bytes(),
            ))
        }
        Err(e) => Err(AuthHttpOutcome::Unavailable(e.to_string())),
    }
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

    fn logins() -> [BackendLogin; 4] {
        [
            BackendLogin::Client,
            BackendLogin::UserPass,
            BackendLogin::AuthPlain,
            BackendLogin::Master(MasterUser {
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
        login: &BackendLogin,
        secrets: Option<&HashMap<String, Secret>>,
        right: bool,
        passthrough: bool,
    ) -> Result<OwnedAuth, ()> {
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
    fn shape(auth: &Result<OwnedAuth, ()>) -> String {
        match auth {
            Err(()) => "refused".into(),
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
                let master = matches!(login, BackendLogin::Master(_));
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
                            let plain = match login {
                                BackendLogin::AuthPlain => true,
                                BackendLogin::UserPass => false,
                                _ => mechanism == Mechanism::Plain,
                            };
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
        let got = decide(Mechanism::Apop, &BackendLogin::Client, None, true, true);
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
