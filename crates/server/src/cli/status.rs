//! `leasehold status` (once, or `--watch`) and `leasehold drain`: the cluster as tables in
//! a terminal, or as JSON for scripts.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::report::{print_error, CliError, CliResult, Exit, Format, Rendered};
use super::tls::{AdminArgs, AdminClient};

/// `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Cluster {
    pub cluster: String,
    /// The member id of the instance that answered.
    #[serde(rename = "self", default)]
    pub self_id: Option<String>,
    pub shard_count: u32,
    pub leader: Option<String>,
    pub assignment_version: u64,
    pub members: usize,
    pub unowned_shards: usize,
    /// Placement frozen by an operator (absent from older instances).
    #[serde(default)]
    pub frozen: bool,
    /// Operator pins: shard → member.
    #[serde(default)]
    pub pins: BTreeMap<String, String>,
    /// One-shot moves not done yet: shard → member.
    #[serde(default)]
    pub moves: BTreeMap<String, String>,
    /// What the leader balances (`count` or `load`; absent from older instances).
    #[serde(default)]
    pub balance: Option<String>,
}

/// Reported load of a member's shards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
pub struct Load {
    pub calls_per_second: f64,
    pub busy: f64,
}

/// One member of `GET /v1/members`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Member {
    pub id: String,
    pub address: String,
    pub admin_address: String,
    pub state: String,
    pub shards: usize,
    /// Absent from older instances.
    #[serde(default)]
    pub load: Load,
}

#[derive(Debug, Deserialize)]
struct Members {
    members: Vec<Member>,
}

/// One shard of `GET /v1/shards`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Shard {
    pub shard: u32,
    pub owner: Option<String>,
    #[serde(default)]
    pub address: Option<String>,
    pub epoch: u64,
    pub state: String,
    pub assigned_to: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Shards {
    shards: Vec<Shard>,
}

/// What `leasehold status` shows: the cluster, its members and its shards.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub cluster: Cluster,
    pub members: Vec<Member>,
    pub shards: Vec<Shard>,
}

/// The shards one owner holds in one state (`leasehold status` without `--shards`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OwnerRanges {
    /// `None` for shards without an owner.
    pub owner: Option<String>,
    pub state: String,
    pub count: usize,
    /// The shard numbers as ranges: `0-3,7`.
    pub ranges: String,
}

fn fetch<T: for<'de> Deserialize<'de>>(admin: &AdminClient, path: &str) -> CliResult<T> {
    let url = format!("{}{path}", admin.base);
    let resp = admin
        .request("GET", path)
        .call()
        .map_err(|e| CliError::from_ureq(e).context(format!("GET {url}")))?;
    resp.into_json()
        .map_err(|e| CliError::new(Exit::Software, format!("reading {url}: {e}")))
}

/// Reads the cluster, its members and its shards from the admin plane.
pub fn fetch_snapshot(admin: &AdminClient) -> CliResult<Snapshot> {
    Ok(Snapshot {
        cluster: fetch(admin, "/v1/cluster")?,
        members: fetch::<Members>(admin, "/v1/members")?.members,
        shards: fetch::<Shards>(admin, "/v1/shards")?.shards,
    })
}

/// Renders shard numbers as ranges: `0-3,7,9-12`.
pub fn ranges(shards: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < shards.len() {
        let start = shards[i];
        let mut end = start;
        while i + 1 < shards.len() && shards[i + 1] == end + 1 {
            i += 1;
            end = shards[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            let _ = write!(out, "{start}");
        } else {
            let _ = write!(out, "{start}-{end}");
        }
        i += 1;
    }
    out
}

/// Groups shards by owner and state, in the order of the owner's id (unowned first).
pub fn owner_ranges(shards: &[Shard]) -> Vec<OwnerRanges> {
    let mut groups: BTreeMap<(Option<String>, String), Vec<u32>> = BTreeMap::new();
    for s in shards {
        groups
            .entry((s.owner.clone(), s.state.clone()))
            .or_default()
            .push(s.shard);
    }
    groups
        .into_iter()
        .map(|((owner, state), shards)| OwnerRanges {
            owner,
            state,
            count: shards.len(),
            ranges: ranges(&shards),
        })
        .collect()
}

/// `leasehold status`: the cluster summary, the members, and shard ownership (ranges per
/// owner and state, or one row per shard with `per_shard`).
pub fn run(args: &AdminArgs, per_shard: bool) -> CliResult<Rendered> {
    let admin = &AdminClient::new(args)?;
    Ok(render_status(&fetch_snapshot(admin)?, per_shard))
}

/// What `leasehold status` prints. JSON: `{"cluster", "members", "shards"}` with
/// `per_shard`, else `{"cluster", "members", "owners"}` (ranges per owner and state).
pub fn render_status(snapshot: &Snapshot, per_shard: bool) -> Rendered {
    let owners = owner_ranges(&snapshot.shards);
    let mut text = String::new();
    write_summary(&mut text, &snapshot.cluster);
    write_members(&mut text, &snapshot.members);
    text.push('\n');
    let json = if per_shard {
        write_shards(&mut text, &snapshot.shards);
        json!({
            "cluster": snapshot.cluster,
            "members": snapshot.members,
            "shards": snapshot.shards,
        })
    } else {
        write_owner_ranges(&mut text, &owners);
        json!({
            "cluster": snapshot.cluster,
            "members": snapshot.members,
            "owners": owners,
        })
    };
    Rendered {
        text: text.trim_end().to_owned(),
        json,
    }
}

fn write_summary(out: &mut String, c: &Cluster) {
    let _ = write!(
        out,
        "cluster {}  shards {}  members {}  leader {}  assignment v{}  unowned {}",
        c.cluster,
        c.shard_count,
        c.members,
        c.leader.as_deref().unwrap_or("-"),
        c.assignment_version,
        c.unowned_shards
    );
    if c.frozen {
        out.push_str("  FROZEN");
    }
    if let Some(balance) = &c.balance {
        let _ = write!(out, "  balance {balance}");
    }
    if !c.pins.is_empty() {
        let pins: Vec<String> = c.pins.iter().map(|(s, m)| format!("{s}→{m}")).collect();
        let _ = write!(out, "  pins {}", pins.join(","));
    }
    if !c.moves.is_empty() {
        let moves: Vec<String> = c.moves.iter().map(|(s, m)| format!("{s}→{m}")).collect();
        let _ = write!(out, "  moving {}", moves.join(","));
    }
    out.push_str("\n\n");
}

fn write_members(out: &mut String, members: &[Member]) {
    let _ = writeln!(
        out,
        "{:<24} {:<9} {:>6} {:>9} {:>7}  {:<22} {}",
        "MEMBER", "STATE", "SHARDS", "CALLS/S", "BUSY", "ADDRESS", "ADMIN"
    );
    for m in members {
        let _ = writeln!(
            out,
            "{:<24} {:<9} {:>6} {:>9.1} {:>7.3}  {:<22} {}",
            m.id,
            m.state,
            m.shards,
            m.load.calls_per_second,
            m.load.busy,
            m.address,
            m.admin_address
        );
    }
}

fn write_shards(out: &mut String, shards: &[Shard]) {
    let _ = writeln!(
        out,
        "{:>6}  {:<24} {:>10}  {:<8} {}",
        "SHARD", "OWNER", "EPOCH", "STATE", "ASSIGNED"
    );
    for s in shards {
        let _ = writeln!(
            out,
            "{:>6}  {:<24} {:>10}  {:<8} {}",
            s.shard,
            s.owner.as_deref().unwrap_or("-"),
            s.epoch,
            s.state,
            s.assigned_to.as_deref().unwrap_or("-")
        );
    }
}

fn write_owner_ranges(out: &mut String, owners: &[OwnerRanges]) {
    let _ = writeln!(
        out,
        "{:<24} {:<8} {:>6}  {}",
        "OWNER", "STATE", "COUNT", "SHARDS"
    );
    for o in owners {
        let _ = writeln!(
            out,
            "{:<24} {:<8} {:>6}  {}",
            o.owner.as_deref().unwrap_or("-"),
            o.state,
            o.count,
            o.ranges
        );
    }
}

/// `leasehold status --watch`: polls every `interval` and prints the status again each
/// time it changes, until Ctrl-C (exit 0). Errors are shown in place of the tables and
/// retried; only bad flags (TLS files, token file) end the command.
pub fn watch(
    args: &AdminArgs,
    per_shard: bool,
    interval: Duration,
    format: Format,
) -> std::process::ExitCode {
    let admin = match AdminClient::new(args) {
        Ok(admin) => admin,
        Err(e) => {
            print_error(&e, format);
            return e.exit.into();
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let e = CliError::new(Exit::Software, format!("cannot start the runtime: {e}"));
            print_error(&e, format);
            return e.exit.into();
        }
    };
    let screen = Screen {
        format,
        interval,
        terminal: std::io::IsTerminal::is_terminal(&std::io::stdout()),
    };
    runtime.block_on(async {
        tokio::select! {
            () = poll(admin, per_shard, screen) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    });
    // A poll may still be waiting on the admin plane; do not wait for it.
    runtime.shutdown_background();
    Exit::Ok.into()
}

/// Polls forever, printing each change.
async fn poll(admin: AdminClient, per_shard: bool, screen: Screen) {
    let admin = std::sync::Arc::new(admin);
    let mut last: Option<String> = None;
    loop {
        let fetching = admin.clone();
        let result = tokio::task::spawn_blocking(move || fetch_snapshot(&fetching))
            .await
            .unwrap_or_else(|e| {
                Err(CliError::new(
                    Exit::Software,
                    format!("status poll failed: {e}"),
                ))
            });
        let body = match &result {
            Ok(snapshot) => render_status(snapshot, per_shard).in_format(screen.format),
            Err(e) => screen.error(e),
        };
        if last.as_deref() != Some(body.as_str()) {
            if let Err(e) = &result {
                if screen.format == Format::Json {
                    eprintln!("error: {e}");
                }
            }
            let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            print!(
                "{}",
                screen.frame(last.is_some(), &body, &stamp.to_string())
            );
            let _ = std::io::Write::flush(&mut std::io::stdout());
            last = Some(body);
        }
        tokio::time::sleep(screen.interval).await;
    }
}

/// Where `--watch` prints, and how.
#[derive(Debug, Clone, Copy)]
pub struct Screen {
    pub format: Format,
    pub interval: Duration,
    /// Stdout is a terminal: clear it for each change instead of separating them.
    pub terminal: bool,
}

impl Screen {
    /// An error shown in place of the tables (or a JSON error document).
    pub fn error(&self, e: &CliError) -> String {
        match self.format {
            Format::Text => format!("error: {e}"),
            Format::Json => e.to_json().to_string(),
        }
    }

    /// What to print for a change: JSON lines as they are; text under a header line,
    /// after clearing the terminal, or after a `---` line when not on a terminal.
    pub fn frame(&self, after_another: bool, body: &str, timestamp: &str) -> String {
        if self.format == Format::Json {
            return format!("{body}\n");
        }
        let start = if self.terminal {
            "\x1b[2J\x1b[H"
        } else if after_another {
            "---\n"
        } else {
            ""
        };
        let every = humantime::format_duration(self.interval);
        format!("{start}every {every} · {timestamp}\n\n{body}\n")
    }
}

/// `leasehold drain`: marks the member behind `admin` draining (or `member`, when given)
/// and waits until it owns no shard. Used as the Kubernetes preStop hook.
pub fn drain(args: &AdminArgs, member: Option<&str>, wait: Duration) -> CliResult<Rendered> {
    let admin = &AdminClient::new(args)?;
    let id = match member {
        Some("") => {
            return Err(CliError::usage(
                "the member id must not be empty (--member)",
            ))
        }
        Some(m) => m.to_owned(),
        None => fetch::<serde_json::Value>(admin, "/v1/cluster")?["self"]
            .as_str()
            .ok_or_else(|| {
                CliError::new(
                    Exit::Software,
                    "the admin endpoint did not say which member it is",
                )
            })?
            .to_owned(),
    };
    let path = format!("/v1/members/{id}/drain");
    admin
        .request("POST", &path)
        .call()
        .map_err(|e| CliError::from_ureq(e).context(format!("POST {}{path}", admin.base)))?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        let members: Members = fetch(admin, "/v1/members")?;
        let owned = members
            .members
            .iter()
            .find(|m| m.id == id)
            .map_or(0, |m| m.shards);
        if owned == 0 {
            return Ok(drained_answer(&id));
        }
        if std::time::Instant::now() >= deadline {
            return Err(CliError::new(
                Exit::TempFail,
                format!("member {id} still owns {owned} shards after {wait:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What `leasehold drain` prints once the member owns no shard.
pub fn drained_answer(id: &str) -> Rendered {
    Rendered {
        text: format!("member {id} drained"),
        json: json!({ "member": id, "shards_left": 0, "drained": true }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(shard: u32, owner: Option<&str>, epoch: u64, state: &str) -> Shard {
        Shard {
            shard,
            owner: owner.map(Into::into),
            address: owner.map(|o| format!("http://{o}:7070")),
            epoch,
            state: state.into(),
            assigned_to: owner.map(Into::into),
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            cluster: Cluster {
                cluster: "prod".into(),
                self_id: Some("n0".into()),
                shard_count: 4,
                leader: Some("n0".into()),
                assignment_version: 7,
                members: 1,
                unowned_shards: 1,
                frozen: false,
                pins: BTreeMap::new(),
                moves: BTreeMap::new(),
                balance: Some("load".into()),
            },
            members: vec![Member {
                id: "n0".into(),
                address: "http://n0:7070".into(),
                admin_address: "http://n0:7071".into(),
                state: "active".into(),
                shards: 3,
                load: Load {
                    calls_per_second: 12.5,
                    busy: 0.25,
                },
            }],
            shards: vec![
                shard(0, Some("n0"), 5, "owned"),
                shard(1, Some("n0"), 5, "owned"),
                shard(2, None, 0, "unowned"),
                shard(3, Some("n0"), 6, "owned"),
            ],
        }
    }

    #[test]
    fn status_text_groups_shards_by_owner() {
        let text = render_status(&snapshot(), false).text;
        let expected = "\
cluster prod  shards 4  members 1  leader n0  assignment v7  unowned 1  balance load

MEMBER                   STATE     SHARDS   CALLS/S    BUSY  ADDRESS                ADMIN
n0                       active         3      12.5   0.250  http://n0:7070         http://n0:7071

OWNER                    STATE     COUNT  SHARDS
-                        unowned       1  2
n0                       owned         3  0-1,3";
        assert_eq!(text, expected);
    }

    #[test]
    fn status_text_per_shard() {
        let text = render_status(&snapshot(), true).text;
        let table: Vec<&str> = text.lines().skip(5).collect();
        assert_eq!(
            table,
            [
                " SHARD  OWNER                         EPOCH  STATE    ASSIGNED",
                "     0  n0                                5  owned    n0",
                "     1  n0                                5  owned    n0",
                "     2  -                                 0  unowned  -",
                "     3  n0                                6  owned    n0",
            ]
        );
    }

    #[test]
    fn the_summary_says_frozen_and_lists_pins() {
        let mut snapshot = snapshot();
        snapshot.cluster.frozen = true;
        snapshot.cluster.pins.insert("3".into(), "n1".into());
        snapshot.cluster.moves.insert("2".into(), "n0".into());
        let text = render_status(&snapshot, false).text;
        assert!(
            text.lines()
                .next()
                .unwrap()
                .ends_with("unowned 1  FROZEN  balance load  pins 3→n1  moving 2→n0"),
            "{text}"
        );
    }

    #[test]
    fn status_json_has_the_cluster_members_and_owners() {
        let json = render_status(&snapshot(), false).json;
        assert_eq!(
            json["cluster"],
            json!({
                "cluster": "prod", "self": "n0", "shard_count": 4, "leader": "n0",
                "assignment_version": 7, "members": 1, "unowned_shards": 1,
                "frozen": false, "pins": {}, "moves": {}, "balance": "load"
            })
        );
        assert_eq!(
            json["members"],
            json!([{
                "id": "n0", "address": "http://n0:7070", "admin_address": "http://n0:7071",
                "state": "active", "shards": 3,
                "load": {"calls_per_second": 12.5, "busy": 0.25}
            }])
        );
        assert_eq!(
            json["owners"],
            json!([
                {"owner": null, "state": "unowned", "count": 1, "ranges": "2"},
                {"owner": "n0", "state": "owned", "count": 3, "ranges": "0-1,3"},
            ])
        );
        assert!(json.get("shards").is_none());
    }

    #[test]
    fn status_json_per_shard_has_every_shard() {
        let json = render_status(&snapshot(), true).json;
        assert!(json.get("owners").is_none());
        assert_eq!(json["shards"].as_array().map(Vec::len), Some(4));
        assert_eq!(
            json["shards"][2],
            json!({
                "shard": 2, "owner": null, "address": null, "epoch": 0,
                "state": "unowned", "assigned_to": null
            })
        );
    }

    #[test]
    fn drain_json_says_nothing_is_left() {
        let answer = drained_answer("n2");
        assert_eq!(answer.text, "member n2 drained");
        assert_eq!(
            answer.json,
            json!({"member": "n2", "shards_left": 0, "drained": true})
        );
    }

    fn screen(format: Format, terminal: bool) -> Screen {
        Screen {
            format,
            interval: Duration::from_secs(1),
            terminal,
        }
    }

    #[test]
    fn watch_separates_changes_in_a_pipe() {
        let pipe = screen(Format::Text, false);
        let ts = "2025-01-01T00:00:00Z";
        assert_eq!(
            pipe.frame(false, "table", ts),
            format!("every 1s · {ts}\n\ntable\n")
        );
        assert_eq!(
            pipe.frame(true, "table", ts),
            format!("---\nevery 1s · {ts}\n\ntable\n")
        );
    }

    #[test]
    fn watch_clears_a_terminal() {
        let frame = screen(Format::Text, true).frame(true, "table", "now");
        assert_eq!(frame, "\x1b[2J\x1b[Hevery 1s · now\n\ntable\n");
    }

    #[test]
    fn watch_prints_json_lines() {
        let json = screen(Format::Json, true);
        assert_eq!(json.frame(true, r#"{"a":1}"#, "now"), "{\"a\":1}\n");
        let e = CliError::new(Exit::Unavailable, "cannot connect");
        let line: serde_json::Value = serde_json::from_str(&json.error(&e)).expect("JSON");
        assert_eq!(
            line,
            json!({"error": "cannot connect", "code": "unavailable"})
        );
        assert_eq!(
            screen(Format::Text, false).error(&e),
            "error: cannot connect"
        );
    }

    #[test]
    fn shard_ranges_are_compact() {
        assert_eq!(ranges(&[0, 1, 2, 3, 7, 9, 10]), "0-3,7,9-10");
        assert_eq!(ranges(&[]), "");
        assert_eq!(ranges(&[5]), "5");
    }
}
