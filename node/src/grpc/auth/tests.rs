//! Who may call: tokens, roles and client certificates, checked on the policy itself.
//! Calls over the wire through the coordinator's client are `stillpoint::grpc::tests`.

use super::*;

const OPERATOR: &str = "op-0123456789abcdef-secret";
const OBSERVER: &str = "obs-0123456789abcdef-secret";

fn token(text: &str) -> AdminToken {
    AdminToken::parse(text, "test").unwrap()
}

fn security() -> AdminSecurity {
    AdminSecurity::default()
        .with_token(&token(OPERATOR), Role::Operator)
        .unwrap()
        .with_token(&token(OBSERVER), Role::Observer)
        .unwrap()
}

fn headers(authorization: &[&str]) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    for value in authorization {
        headers.append(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(value).unwrap(),
        );
    }
    headers
}

fn check(policy: &Policy, path: &str, authorization: &[&str]) -> Result<(), tonic::Code> {
    policy
        .check(path, &headers(authorization), &http::Extensions::new())
        .map_err(|status| status.code())
}

#[test]
fn tokens_are_trimmed_checked_and_named_by_origin_only() {
    assert_eq!(token(" abc\n").expose(), "abc");
    for (text, expected) in [
        ("", "is empty"),
        ("  \n", "is empty"),
        ("two words", "cannot go in an HTTP header"),
        ("tab\there", "cannot go in an HTTP header"),
        ("é-accent", "cannot go in an HTTP header"),
    ] {
        let error = AdminToken::parse(text, "file /etc/token").unwrap_err();
        let message = error.to_string();
        assert!(message.contains(expected), "{text:?}: {message}");
        assert!(message.contains("file /etc/token"), "{message}");
    }
    let long = "x".repeat(MAX_TOKEN_LEN + 1);
    assert!(matches!(
        AdminToken::parse(&long, "t"),
        Err(TokenError::TooLong { .. })
    ));
    // A node refuses a guessable token; a client may still send whatever it was given.
    let short = AdminSecurity::default()
        .with_token(&token("changeme"), Role::Operator)
        .unwrap_err();
    assert!(short.to_string().contains("at least 16"), "{short}");
    assert!(!short.to_string().contains("changeme"), "{short}");
}

#[test]
fn token_files_are_read_and_missing_ones_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, format!("{OPERATOR}\n")).unwrap();
    assert_eq!(AdminToken::from_file(&path).unwrap().expose(), OPERATOR);
    let missing = AdminToken::from_file(&dir.path().join("nope")).unwrap_err();
    assert!(missing.to_string().contains("nope"), "{missing}");
}

#[test]
fn secrets_never_show_in_debug() {
    let identity = ClientIdentity {
        cert_pem: "CERT".to_owned(),
        key_pem: Secret::new("KEY-MATERIAL"),
    };
    let server = ServerTls::new("CERT", Secret::new("KEY-MATERIAL")).with_client_ca("CA");
    let security = security().with_tls(server.clone());
    for printed in [
        format!("{:?}", token(OPERATOR)),
        format!("{identity:?}"),
        format!("{server:?}"),
        format!("{security:?}"),
        format!("{:?}", security.policy()),
    ] {
        for secret in [OPERATOR, OBSERVER, "KEY-MATERIAL"] {
            assert!(!printed.contains(secret), "{secret} leaked in {printed}");
        }
    }
    // And the redaction is visible, so nobody mistakes it for an empty value.
    assert!(format!("{identity:?}").contains("redacted"));
}

#[test]
fn operators_may_do_everything_observers_only_read() {
    let policy = security().policy();
    let operator = format!("Bearer {OPERATOR}");
    let observer = format!("Bearer {OBSERVER}");
    for path in [
        "/rpc.Admin/Pause",
        "/rpc.Admin/Unpause",
        "/stillpoint.admin.v1.LeaseAdmin/Pause",
        "/stillpoint.admin.v1.LeaseAdmin/Renew",
        "/stillpoint.admin.v1.LeaseAdmin/Unpause",
        // A method nobody listed is an operator's.
        "/stillpoint.admin.v1.LeaseAdmin/SomethingNew",
    ] {
        assert_eq!(check(&policy, path, &[&operator]), Ok(()), "{path}");
        assert_eq!(
            check(&policy, path, &[&observer]),
            Err(tonic::Code::PermissionDenied),
            "{path}"
        );
    }
    for path in [
        "/rpc.Admin/CheckPaused",
        "/rpc.Admin/Stats",
        "/stillpoint.admin.v1.LeaseAdmin/Status",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    ] {
        assert_eq!(check(&policy, path, &[&observer]), Ok(()), "{path}");
        assert_eq!(check(&policy, path, &[&operator]), Ok(()), "{path}");
    }
}

#[test]
fn missing_wrong_and_malformed_tokens_are_unauthenticated() {
    let policy = security().policy();
    let path = "/rpc.Admin/CheckPaused";
    let unauthenticated = Err(tonic::Code::Unauthenticated);
    assert_eq!(check(&policy, path, &[]), unauthenticated);
    assert_eq!(
        check(&policy, path, &["Bearer not-the-token-at-all"]),
        unauthenticated
    );
    // A prefix of the right token is as wrong as any other.
    assert_eq!(
        check(&policy, path, &[&format!("Bearer {}", &OPERATOR[..20])]),
        unauthenticated
    );
    assert_eq!(check(&policy, path, &[OPERATOR]), unauthenticated);
    assert_eq!(
        check(&policy, path, &["Basic dXNlcjpwYXNz"]),
        unauthenticated
    );
    assert_eq!(check(&policy, path, &["Bearer "]), unauthenticated);
    // Two headers, one right: ambiguous, refused.
    let right = format!("Bearer {OPERATOR}");
    assert_eq!(
        check(&policy, path, &["Bearer wrong-wrong-wrong", &right]),
        unauthenticated
    );
    // The scheme is case-insensitive (RFC 9110), the token is not.
    assert_eq!(
        check(&policy, path, &[&format!("bearer {OPERATOR}")]),
        Ok(())
    );
    assert_eq!(
        check(
            &policy,
            path,
            &[&format!("Bearer {}", OPERATOR.to_uppercase())]
        ),
        unauthenticated
    );
    // Without tokens configured, nothing is asked for.
    assert_eq!(
        check(&AdminSecurity::default().policy(), "/rpc.Admin/Pause", &[]),
        Ok(())
    );
}

#[test]
fn mutual_tls_without_a_client_certificate_is_unauthenticated() {
    let security = AdminSecurity::default()
        .with_tls(ServerTls::new("CERT", Secret::new("KEY")).with_client_ca("CA"));
    assert!(security.checks_calls());
    let status = security
        .policy()
        .check(
            "/rpc.Admin/CheckPaused",
            &http::HeaderMap::new(),
            &http::Extensions::new(),
        )
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(status.message().starts_with(NO_CLIENT_CERT), "{status:?}");
    // TLS without a client CA asks for no certificate.
    let tls_only = AdminSecurity::default().with_tls(ServerTls::new("CERT", Secret::new("KEY")));
    assert!(!tls_only.checks_calls());
}
