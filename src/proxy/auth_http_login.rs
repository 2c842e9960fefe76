//! nginx-style auth_http login: ask the service, then log in at the store it names. The decision of what
//! to send a store lives in `crate::auth::decision`.

use crate::auth::decision::{OwnedAuth, password_as_plain};
use crate::secret::Secret;
use crate::session::{ClientSession, Credentials, Mechanism};
use crate::store::LoginError;
use crate::store::connection::{ClientInfo, StoreAuth};

use super::snapshot::TenantRuntime;

/// One auth_http login's facts.
pub(super) struct AuthHttpLogin<'a> {
    pub(super) service: &'a crate::auth::http::AuthHttp,
    /// popgate's resolver, for the store the service names.
    pub(super) discovery: &'a crate::store::dns::Discovery,
    pub(super) tenant: &'a TenantRuntime,
    pub(super) creds: &'a Credentials,
    pub(super) auth: &'a OwnedAuth,
    pub(super) store_user: &'a str,
    pub(super) client: &'a ClientInfo,
    /// This connection's login attempt, from 1 (`Auth-Login-Attempt`, as nginx counts).
    pub(super) attempt: u32,
}

pub(super) enum AuthHttpOutcome {
    LoggedIn(crate::store::LoggedIn, String),
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
        store_user,
        client,
        ..
    } = login;
    // With popgate's own resolver (`dns:`), as the stores' names are, never the system's.
    let target = crate::store::dns::Target::Host {
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
    let user = user.unwrap_or_else(|| store_user.to_string());
    let plain = password_as_plain(&tenant.backend_login);
    let store_auth = match (&pass, auth) {
        (Some(p), _) => StoreAuth::Password {
            user: &user,
            password: p,
            authzid: None,
            plain,
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
            plain,
        },
    };
    let endpoint = crate::store::dns::Endpoint {
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
    let request = crate::auth::http::AuthRequest {
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
        Ok(crate::auth::http::AuthAnswer::Ok {
            server,
            port,
            user,
            pass,
        }) => Ok((server, port, user, pass)),
        Ok(crate::auth::http::AuthAnswer::Refused { message, wait }) => {
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
