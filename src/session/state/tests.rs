#![allow(clippy::unwrap_used)]

use super::*;
use crate::protocol::sasl::encode_b64;
use crate::session::Offer;

const LIMITS: Limits = Limits {
    max_bad_commands: 3,
    max_failed_logins: 2,
};

fn plain_port(plaintext: bool) -> Authorization {
    Authorization::new(
        Transport {
            tls: false,
            stls_offered: true,
            plaintext_before_tls: plaintext,
        },
        LIMITS,
    )
}

fn sent(actions: &[Action]) -> String {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
        .collect()
}

fn login_of(actions: &[Action]) -> Option<&Credentials> {
    actions.iter().find_map(|a| match a {
        Action::Login(c) => Some(c),
        _ => None,
    })
}

#[test]
fn capa_offers_what_works_on_this_transport() {
    let mut m = plain_port(false);
    let capa = sent(&m.on_line(b"CAPA"));
    assert!(
        capa.contains("STLS\r\n") && !capa.contains("USER") && !capa.contains("SASL"),
        "{capa}"
    );
    assert!(capa.contains("RESP-CODES") && capa.contains("PIPELINING") && capa.ends_with(".\r\n"));

    let mut m = plain_port(true);
    let capa = sent(&m.on_line(b"capa"));
    assert!(
        capa.contains("USER\r\n") && capa.contains("SASL PLAIN LOGIN\r\n"),
        "{capa}"
    );

    m.on_line(b"STLS");
    m.on_tls_established();
    let capa = sent(&m.on_line(b"CAPA"));
    assert!(!capa.contains("STLS") && capa.contains("USER"), "{capa}");
}

#[test]
fn user_pass_produces_credentials_and_user_never_probes() {
    let mut m = plain_port(true);
    assert_eq!(sent(&m.on_line(b"USER nobody@nowhere.invalid")), "+OK\r\n");
    assert_eq!(sent(&m.on_line(b"USER alice@example.com")), "+OK\r\n");
    let actions = m.on_line(b"PASS pass word");
    let c = login_of(&actions).unwrap();
    assert_eq!(c.login, "alice@example.com");
    assert_eq!(c.password.expose(), b"pass word");
    assert_eq!(c.mechanism, Mechanism::UserPass);
    assert!(m.is_waiting());
}

/// Each accepted USER names the client once, for the driver to get a store ready; a USER refused before
/// TLS, a PASS or another command names nobody.
#[test]
fn an_accepted_user_names_the_client_once() {
    let mut m = plain_port(false);
    m.on_line(b"USER alice@example.com");
    assert_eq!(m.take_named(), None, "refused: TLS required");
    let mut m = plain_port(true);
    m.on_line(b"USER alice@example.com");
    assert_eq!(m.take_named().as_deref(), Some("alice@example.com"));
    assert_eq!(m.take_named(), None);
    m.on_line(b"CAPA");
    assert_eq!(m.take_named(), None);
    m.on_line(b"USER bob@example.com");
    m.on_line(b"PASS secret");
    assert_eq!(m.take_named().as_deref(), Some("bob@example.com"));
}

#[test]
fn rejected_login_allows_retry_then_closes_at_the_bound() {
    let mut m = plain_port(true);
    m.on_line(b"USER a@example.com");
    m.on_line(b"PASS x");
    let a = m.on_login_rejected(b"-ERR [AUTH] Authentication failed.\r\n".to_vec());
    assert_eq!(
        a,
        vec![Action::Send(
            b"-ERR [AUTH] Authentication failed.\r\n".to_vec()
        )]
    );
    assert!(!m.is_waiting());
    m.on_line(b"USER a@example.com");
    assert!(login_of(&m.on_line(b"PASS y")).is_some());
    let a = m.on_login_rejected(b"-ERR [AUTH] no\r\n".to_vec());
    assert_eq!(a.last(), Some(&Action::Close));
    assert!(m.is_closed());
}

#[test]
fn plaintext_refused_before_tls_when_no_tenant_allows_it() {
    let mut m = plain_port(false);
    assert!(sent(&m.on_line(b"USER a@example.com")).starts_with("-ERR [AUTH] TLS required"));
    assert!(sent(&m.on_line(b"AUTH PLAIN AGEAYg==")).starts_with("-ERR [AUTH] TLS required"));
    // After STLS the same login goes through.
    let mut m = plain_port(false);
    assert_eq!(
        m.on_line(b"STLS"),
        vec![
            Action::Send(b"+OK Begin TLS negotiation\r\n".to_vec()),
            Action::StartTls
        ]
    );
    m.on_tls_established();
    m.on_line(b"USER a@example.com");
    assert!(login_of(&m.on_line(b"PASS b")).is_some());
}

#[test]
fn second_stls_is_refused() {
    let mut m = plain_port(true);
    m.on_line(b"STLS");
    m.on_tls_established();
    assert!(sent(&m.on_line(b"STLS")).starts_with("-ERR"));
    let mut m = Authorization::new(
        Transport {
            tls: false,
            stls_offered: false,
            plaintext_before_tls: true,
        },
        LIMITS,
    );
    assert!(sent(&m.on_line(b"STLS")).starts_with("-ERR"));
    assert!(!sent(&m.on_line(b"CAPA")).contains("STLS"));
}

#[test]
fn auth_plain_with_and_without_initial_response() {
    let ir = encode_b64(b"\0bob@example.net\0pw");
    let mut m = plain_port(true);
    let c = login_of(&m.on_line(format!("AUTH PLAIN {ir}").as_bytes()))
        .cloned()
        .unwrap();
    assert_eq!(
        (c.login.as_str(), c.mechanism),
        ("bob@example.net", Mechanism::Plain)
    );

    let mut m = plain_port(true);
    assert_eq!(sent(&m.on_line(b"AUTH PLAIN")), "+ \r\n");
    assert_eq!(m.line_limit(), crate::protocol::MAX_SASL_LINE);
    let c = login_of(&m.on_line(ir.as_bytes())).cloned().unwrap();
    assert_eq!(c.password.expose(), b"pw");
}

#[test]
fn auth_login_and_cancel() {
    let mut m = plain_port(true);
    assert_eq!(sent(&m.on_line(b"AUTH LOGIN")), "+ VXNlcm5hbWU6\r\n");
    assert_eq!(
        sent(&m.on_line(encode_b64(b"carol@example.com").as_bytes())),
        "+ UGFzc3dvcmQ6\r\n"
    );
    let c = login_of(&m.on_line(encode_b64(b"pw").as_bytes()))
        .cloned()
        .unwrap();
    assert_eq!(
        (c.login.as_str(), c.mechanism),
        ("carol@example.com", Mechanism::Login)
    );

    let mut m = plain_port(true);
    m.on_line(b"AUTH LOGIN");
    assert!(sent(&m.on_line(b"*")).starts_with("-ERR [AUTH]"));
    assert_eq!(m.line_limit(), crate::protocol::MAX_COMMAND_LINE);
    assert!(sent(&m.on_line(b"NOOP")).starts_with("-ERR"));
}

#[test]
fn bare_auth_lists_mechanisms() {
    let mut m = plain_port(true);
    assert_eq!(
        sent(&m.on_line(b"AUTH")),
        "+OK Supported mechanisms follow\r\nPLAIN\r\nLOGIN\r\n.\r\n"
    );
}

#[test]
fn smuggled_crlf_in_sasl_is_refused() {
    let mut m = plain_port(true);
    let evil = encode_b64(b"\0a@example.com\0pw\r\nDELE 1");
    let a = m.on_line(format!("AUTH PLAIN {evil}").as_bytes());
    assert!(login_of(&a).is_none());
    assert!(sent(&a).contains("forbidden characters"));
}

#[test]
fn transaction_commands_before_login_and_bad_command_bound() {
    let mut m = plain_port(true);
    assert!(sent(&m.on_line(b"STAT")).starts_with("-ERR"));
    assert!(sent(&m.on_line(b"RETR 1")).starts_with("-ERR"));
    let last = m.on_line(b"\x01\x02");
    assert_eq!(last.last(), Some(&Action::Close));
    assert!(m.is_closed());
}

#[test]
fn pass_without_user_and_quit() {
    let mut m = plain_port(true);
    assert!(sent(&m.on_line(b"PASS x")).starts_with("-ERR"));
    let a = m.on_line(b"QUIT");
    assert_eq!(a.last(), Some(&Action::Close));
    assert!(sent(&a).starts_with("+OK"));
}

#[test]
fn too_long_line_gets_err_and_counts() {
    let mut m = plain_port(true);
    assert_eq!(sent(&m.on_too_long()), "-ERR Line too long\r\n");
    m.on_too_long();
    assert_eq!(m.on_too_long().last(), Some(&Action::Close));
}

/// Arbitrary byte lines never panic and never produce a login without a password.
#[test]
fn arbitrary_lines_keep_invariants() {
    let samples: Vec<&[u8]> = vec![
        b"",
        b" ",
        b"USER",
        b"USER \xff",
        b"PASS",
        b"AUTH PLAIN =",
        b"AUTH LOGIN =",
        b"AUTH X Y Z",
        b"APOP a",
        b"\0",
        b"CAPA\0",
        b"*",
        b"+",
        b".",
        b"USER a b",
        b"AUTH PLAIN AAAA",
    ];
    for a in &samples {
        for b in &samples {
            let mut m = plain_port(true);
            for line in [*a, *b, b"PASS p".as_slice()] {
                for act in m.on_line(line) {
                    if let Action::Login(c) = act {
                        assert!(!c.login.is_empty() && !c.password.expose().is_empty());
                    }
                }
            }
        }
    }
}

fn offering(mechanisms: Vec<Mechanism>, challenge: Option<&str>) -> Authorization {
    Authorization::with_offer(
        Transport {
            tls: false,
            stls_offered: true,
            plaintext_before_tls: true,
        },
        LIMITS,
        Offer {
            mechanisms,
            greeting: b"+OK hi <1.2@x>\r\n".to_vec(),
            challenge: challenge.map(str::to_string),
            utf8: true,
            login_delay: None,
        },
    )
}

#[test]
fn apop_and_cram_md5_need_a_challenge_and_carry_it() {
    let all = vec![
        Mechanism::UserPass,
        Mechanism::Apop,
        Mechanism::CramMd5,
        Mechanism::ScramSha256,
    ];
    let mut m = offering(all.clone(), Some("<1.2@x>"));
    let a = m.on_line(b"APOP mrose c4c9334bac560ecc979e58001b3e22fb");
    let c = login_of(&a).cloned().unwrap();
    assert_eq!((c.mechanism, c.login.as_str()), (Mechanism::Apop, "mrose"));
    assert_eq!(c.challenge.as_deref(), Some("<1.2@x>"));

    let mut m = offering(all.clone(), Some("<1.2@x>"));
    assert_eq!(
        sent(&m.on_line(b"AUTH CRAM-MD5")),
        format!("+ {}\r\n", encode_b64(b"<1.2@x>"))
    );
    let c = login_of(&m.on_line(encode_b64(b"tim b913a602c7eda7a495b4e6e7334d3890").as_bytes()))
        .cloned()
        .unwrap();
    assert_eq!((c.mechanism, c.login.as_str()), (Mechanism::CramMd5, "tim"));
    let capa = sent(&offering(all.clone(), Some("<1.2@x>")).on_line(b"CAPA"));
    assert!(capa.contains("SASL CRAM-MD5 SCRAM-SHA-256\r\n"), "{capa}");

    let mut m = offering(all, None);
    assert!(sent(&m.on_line(b"APOP mrose c4c9334bac560ecc979e58001b3e22fb")).starts_with("-ERR"));
    assert!(!sent(&m.on_line(b"CAPA")).contains("CRAM-MD5"));
}

#[test]
fn scram_client_first_routes_on_the_user() {
    let mut m = offering(vec![Mechanism::ScramSha256], None);
    let ir = encode_b64(b"n,,n=alice@example.com,r=abc");
    let c = login_of(&m.on_line(format!("AUTH SCRAM-SHA-256 {ir}").as_bytes()))
        .cloned()
        .unwrap();
    assert_eq!(c.login, "alice@example.com");
    assert_eq!(c.password.expose(), ir.as_bytes());
    let mut m = offering(vec![Mechanism::ScramSha256], None);
    assert!(sent(&m.on_line(b"AUTH PLAIN AGEAYg==")).starts_with("-ERR [AUTH]"));
    assert!(sent(&m.on_line(b"USER a@b.c")).starts_with("-ERR"));
}

#[test]
fn utf8_names_need_the_utf8_command_first() {
    let mut m = plain_port(true);
    let capa = sent(&m.on_line(b"CAPA"));
    assert!(capa.contains("\r\nUTF8\r\n"), "{capa}");
    // Before UTF8: a non-ASCII name in USER or APOP is refused with [AUTH], nothing is logged in.
    let refused = sent(&m.on_line("USER jörg@bücher.example".as_bytes()));
    assert!(
        refused.starts_with("-ERR [AUTH]") && refused.contains("UTF8"),
        "{refused}"
    );
    assert!(!m.utf8_enabled());
    assert_eq!(sent(&m.on_line(b"utf8")), "+OK UTF8 enabled\r\n");
    assert!(m.utf8_enabled());
    assert_eq!(
        sent(&m.on_line("USER jörg@bücher.example".as_bytes())),
        "+OK\r\n"
    );
    let actions = m.on_line("PASS geheim".as_bytes());
    assert_eq!(login_of(&actions).unwrap().login, "jörg@bücher.example");
}

/// A machine on an implicit-TLS connection with this offer.
fn over_tls(offer: Offer) -> Authorization {
    Authorization::with_offer(
        Transport {
            tls: true,
            stls_offered: false,
            plaintext_before_tls: false,
        },
        LIMITS,
        offer,
    )
}

#[test]
fn utf8_not_offered_is_refused_and_not_listed() {
    let mut offer = Offer::basic();
    offer.utf8 = false;
    let mut m = over_tls(offer);
    let capa = sent(&m.on_line(b"CAPA"));
    assert!(!capa.contains("UTF8"), "{capa}");
    assert!(sent(&m.on_line(b"UTF8")).starts_with("-ERR"));
    assert!(!m.utf8_enabled());
    let refused = sent(&m.on_line("USER jörg@example.com".as_bytes()));
    assert!(refused.starts_with("-ERR [AUTH]"), "{refused}");
    // SASL names are UTF-8 by definition (RFC 4616): no UTF8 command needed.
    let ir = encode_b64("\0jörg@example.com\0pw".as_bytes());
    let actions = m.on_line(format!("AUTH PLAIN {ir}").as_bytes());
    assert_eq!(login_of(&actions).unwrap().login, "jörg@example.com");
}

#[test]
fn login_delay_is_announced_as_offered() {
    for (delay, line) in [
        (Some((300, false)), Some("LOGIN-DELAY 300\r\n")),
        (Some((0, true)), Some("LOGIN-DELAY 0 USER\r\n")),
        (None, None),
    ] {
        let mut offer = Offer::basic();
        offer.login_delay = delay;
        let mut m = over_tls(offer);
        let capa = sent(&m.on_line(b"CAPA"));
        match line {
            Some(l) => assert!(capa.contains(l), "{capa}"),
            None => assert!(!capa.contains("LOGIN-DELAY"), "{capa}"),
        }
    }
}
