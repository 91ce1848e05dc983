//! The deployment files, each checked by the tool made for it: the compose file by
//! `docker-compose config`, the Prometheus configuration and alert rules by `promtool`, the
//! systemd units by `systemd-analyze verify`; and every metric the dashboard and the alert
//! rules query, against the `/metrics` of every kind of anna process.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::binary::{Running, anna, migrated_postgres};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn scratch_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("anna-{what}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs a checking tool; a tool that is missing fails the test (scripts/test installs it).
fn check(program: &str, args: &[&str], dir: &Path) -> (String, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} could not run ({e}); scripts/test installs it"));
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "{program} {args:?} failed:\n{stdout}\n{stderr}");
    (stdout, stderr)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn the_compose_file_is_valid() {
    // deploy/.env is never committed: the check runs on a copy with the example filled in.
    let dir = scratch_dir("compose");
    copy_dir(&deploy_dir(), &dir);
    let example = std::fs::read_to_string(dir.join(".env.example")).unwrap();
    let filled: String = example
        .lines()
        .map(|line| if line.ends_with('=') { format!("{line}set-by-the-test\n") } else { format!("{line}\n") })
        .collect();
    std::fs::write(dir.join(".env"), filled).unwrap();
    check("docker-compose", &["-f", "compose.yaml", "config", "-q"], &dir);
    let (services, _) = check("docker-compose", &["-f", "compose.yaml", "config", "--services"], &dir);
    let services: BTreeSet<&str> = services.lines().collect();
    for service in [
        "postgres",
        "redis",
        "migrate",
        "api-1",
        "api-2",
        "worker-outbox",
        "worker-events",
        "worker-sessions-1",
        "worker-sessions-2",
        "worker-webhooks",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains(service), "{service} is missing from {services:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_prometheus_configuration_and_alert_rules_are_valid() {
    let dir = deploy_dir().join("prometheus");
    let (out, _) = check("promtool", &["check", "config", "prometheus.yml"], &dir);
    assert!(out.contains("1 rule files found"), "{out}");
    check("promtool", &["check", "rules", "alerts.yml"], &dir);
}

#[test]
fn the_systemd_units_verify() {
    // systemd-analyze checks that ExecStart's program exists: point the units at this build.
    let dir = scratch_dir("systemd");
    let mut units = Vec::new();
    for entry in std::fs::read_dir(deploy_dir().join("systemd")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("service") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap().replace("/usr/local/bin/anna", env!("CARGO_BIN_EXE_anna"));
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // A template is verified as one of its instances.
        let name = name.replace("@.service", "@outbox.service");
        std::fs::write(dir.join(&name), text).unwrap();
        units.push(name);
    }
    assert_eq!(units.len(), 4, "{units:?}");
    for unit in &units {
        let (_, stderr) = check("systemd-analyze", &["verify", unit], &dir);
        // It warns without failing on unknown keys and bad values: a warning is a failure here.
        assert!(stderr.trim().is_empty(), "{unit}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The metric names a PromQL expression reads (functions, keywords, label names and
/// Prometheus's own `up` left out).
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Label matchers, ranges and strings go first; then `by (…)` / `without (…)` lists.
    let mut plain = String::new();
    let mut depth = 0;
    for c in expr.chars() {
        match c {
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            _ if depth == 0 => plain.push(c),
            _ => {}
        }
    }
    for keyword in ["by", "without", "on", "ignoring", "group_left", "group_right"] {
        while let Some(at) = find_word(&plain, keyword) {
            let rest = &plain[at + keyword.len()..];
            let end = rest.find(')').map_or(rest.len(), |e| e + 1);
            plain.replace_range(at..at + keyword.len() + end, " ");
        }
    }
    let mut names = BTreeSet::new();
    let chars: Vec<char> = plain.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_alphabetic() || chars[i] == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let called = chars[i..].iter().find(|c| !c.is_whitespace()) == Some(&'(');
            let keyword = matches!(word.as_str(), "and" | "or" | "unless" | "bool" | "offset" | "up" | "e");
            if !called && !keyword {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

fn find_word(text: &str, word: &str) -> Option<usize> {
    text.match_indices(word).map(|(at, _)| at).find(|&at| {
        let before = text[..at].chars().last();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

#[test]
fn metric_names_are_read_from_expressions() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le, route) (rate(http_request_duration_seconds_bucket{status=~"5.."}[5m]))) / clamp_min(sum(rate(x_total[1m])), 1e-9) and up == 0"#,
    );
    assert_eq!(names, BTreeSet::from(["http_request_duration_seconds_bucket".to_owned(), "x_total".to_owned()]));
}

/// Every expression of the dashboard and the alert rules.
fn queried_expressions() -> Vec<String> {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy_dir().join("grafana/dashboard.json")).unwrap()).unwrap();
    // Panels, and the panels of collapsed rows.
    let panels: Vec<Value> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| std::iter::once(panel.clone()).chain(panel["panels"].as_array().cloned().unwrap_or_default()))
        .collect();
    let mut exprs: Vec<String> = panels
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|target| target["expr"].as_str().map(str::to_owned))
        .collect();
    let rules = std::fs::read_to_string(deploy_dir().join("prometheus/alerts.yml")).unwrap();
    exprs.extend(rules.lines().filter_map(|l| l.trim().strip_prefix("expr:")).map(|e| e.trim().to_owned()));
    // Every expression is on one line: a block scalar (`expr: |`) would be read as `|` here.
    for expr in &exprs {
        assert!(!expr.is_empty() && !expr.starts_with(['|', '>']), "write {expr:?} on one line");
    }
    assert!(exprs.len() > 30, "{exprs:?}");
    exprs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_query_exists() {
    let url = migrated_postgres().await;
    let redis = anna_testkit::redis::RedisServer::start(false);
    let redis_url = redis.url();
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("HOST", "127.0.0.1"),
        ("PORT", "0"),
        ("METRICS_PORT", "0"),
        ("SESSIONS_PROVIDER", "simulator"),
    ];
    let mut processes = Vec::new();
    for args in
        [&["api"][..], &["worker", "outbox"], &["worker", "events"], &["worker", "sessions"], &["worker", "webhooks"]]
    {
        let mut process = Running::start(anna(args, &env));
        let metrics = process.addr_from("metrics listening");
        processes.push((args.join(" "), process, metrics));
    }
    // Some traffic, so the families labelled per request exist.
    let api = processes[0].1.listening_addr();
    let http = reqwest::Client::new();
    assert_eq!(http.get(format!("http://{api}/readyz")).send().await.unwrap().status(), 200);
    let email = format!("metrics-{}@example.com", uuid::Uuid::new_v4().simple());
    let reply = http
        .post(format!("http://{api}/users"))
        .json(&json!({"name": "Metrics", "email": email, "password": "correct horse battery"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 201);

    let wanted: BTreeSet<String> = queried_expressions().iter().flat_map(|e| metric_names(e)).collect();
    let mut missing = wanted.clone();
    for _ in 0..100 {
        let mut scraped = String::new();
        for (_, _, metrics) in &processes {
            let reply = http.get(format!("http://{metrics}/metrics")).send().await.unwrap();
            assert_eq!(reply.status(), 200);
            scraped.push_str(&reply.text().await.unwrap());
            let health = http.get(format!("http://{metrics}/healthz")).send().await.unwrap();
            assert_eq!(health.status(), 200);
        }
        missing = wanted
            .iter()
            .filter(|name| {
                !scraped.lines().any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            })
            .cloned()
            .collect();
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(missing.is_empty(), "queried by the dashboard or an alert, reported by no process: {missing:?}");
    for (name, mut process, _) in processes {
        assert!(process.terminate().success(), "{name}");
    }
}
