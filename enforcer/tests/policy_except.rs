//! `except:` on deny rules: an excepted request falls through to the allow rules and
//! `default` (the exception allows nothing by itself), and host-level decisions leave such a
//! host to be judged per request.

mod common;

use common::{kind_rule, policy, req};
use enforcer::policy::{DecisionKind, Policy, Scheme};

const FOO: &str = r#"
default: deny
rules:
  - name: no-foo-except-jira
    deny: { url: "*.foo.com" }
    except: { url: "jira.foo.com" }
  - name: foo
    allow: { url: "*.foo.com" }
  - name: no-db-except-replica
    deny: { tcp: "10.0.0.0/8:5432" }
    except: { tcp: "10.0.0.9:5432" }
  - name: db
    allow: { tcp: "10.0.0.0/8:5432" }
"#;

#[test]
fn an_excepted_request_falls_through_to_the_allows() {
    let p = policy(FOO);
    assert_eq!(
        kind_rule(&req("GET", "https://jira.foo.com/browse/X-1").check(&p)),
        (DecisionKind::Allow, Some("foo"))
    );
    assert_eq!(
        kind_rule(&req("GET", "https://wiki.foo.com/").check(&p)),
        (DecisionKind::Deny, Some("no-foo-except-jira"))
    );
    // The exception alone allows nothing: without the allow rule, default deny.
    let only = policy(
        "default: deny\nrules:\n  - name: d\n    deny: { url: \"*.foo.com\" }\n    except: { url: \"jira.foo.com\" }\n",
    );
    assert_eq!(
        req("GET", "https://jira.foo.com/").check(&only).kind,
        DecisionKind::DefaultDeny
    );
    // Host level: jira is not denied outright, wiki is.
    let now = jiff::Timestamp::now();
    assert!(
        p.host_decision(Scheme::Https, "jira.foo.com", 443, now, None)
            .allowed
    );
    assert!(
        !p.host_decision(Scheme::Https, "wiki.foo.com", 443, now, None)
            .allowed
    );
    assert_eq!(p.tcp_allowed("10.0.0.9", 5432, None), Some("db"));
    assert_eq!(p.tcp_allowed("10.0.0.8", 5432, None), None);
}

#[test]
fn except_goes_with_deny_rules_of_the_same_kind() {
    for (yaml, want) in [
        (
            "rules:\n  - name: a\n    allow: { url: \"x.test\" }\n    except: { url: \"y.test\" }\n",
            "except goes with deny",
        ),
        (
            "rules:\n  - name: a\n    deny: { url: \"x.test\" }\n    except: { tcp: \"x.test:22\" }\n",
            "same kind of match",
        ),
    ] {
        let e = Policy::from_yaml(yaml.as_bytes(), "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{yaml}: {e}");
    }
}
