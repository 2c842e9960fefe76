//! Maildrop stores (the in-repo POP3 server) holding test mailboxes, on 127.0.0.1.

use maildrop::{Faults, Maildrop, Server, Settings};

/// Message `m` of `user`: a subject and one line naming both, so a test can tell any two apart.
pub fn message(user: &str, m: usize) -> Vec<u8> {
    format!("Subject: {m}\r\n\r\nmessage {m} for {user}\r\n").into_bytes()
}

/// A maildrop holding `users` (each with password `pw` and `messages` messages from [`message`]).
pub async fn maildrop(users: &[&str], messages: usize) -> (Maildrop, Server) {
    maildrop_with(users, Faults::default(), |user| {
        (0..messages).map(|m| message(user, m)).collect()
    })
    .await
}

/// A maildrop with these fault hooks, holding `users` (password `pw`), each with the messages
/// `messages(user)` gives.
pub async fn maildrop_with(
    users: &[&str],
    faults: Faults,
    messages: impl Fn(&str) -> Vec<Vec<u8>>,
) -> (Maildrop, Server) {
    let md = Maildrop::new(Settings {
        hostname: "store.test".into(),
        faults,
        ..Settings::default()
    });
    for user in users {
        md.add_mailbox(user, "pw", messages(user));
    }
    let server = md.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (md, server)
}

/// A maildrop with users `u0@example.com` … `u{n-1}@example.com` (password `pw`), `messages` messages
/// each.
pub async fn numbered(users: usize, messages: usize) -> (Maildrop, Server) {
    let names: Vec<String> = (0..users).map(|i| format!("u{i}@example.com")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    maildrop(&names, messages).await
}
