//! A throw-away network for the chaos suite: one Linux bridge in the root namespace and
//! one network namespace per host, joined to the bridge by a veth pair. Faults are made
//! by routing inside a namespace (a blackhole route cuts one direction of one pair) and
//! by taking a namespace's link down. Needs root and `ip` (iproute2).
//!
//! Everything is named `lhc<id>…` so that [`cleanup_stale`] can remove what a crashed
//! earlier run left behind; [`Topology`] removes its own on drop (also while unwinding
//! from a panic).

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Prefix of every namespace and link this module creates.
pub const PREFIX: &str = "lhc";

/// The /24 the suite uses, only inside the bridge and namespaces it creates.
pub const SUBNET: &str = "10.213.0";

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip_output(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Kills every process still inside namespace `ns` (all of them were started by this
/// suite: nothing else enters an `lhc*` namespace).
fn kill_pids_in(ns: &str) {
    for pid in ip_output(&["netns", "pids", ns]).split_whitespace() {
        let _ = Command::new("kill").args(["-CONT", pid]).status();
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
}

/// Removes `lhc*` namespaces (killing what runs inside) and `lhc*` links left by an
/// earlier run that crashed or was interrupted. Returns what it removed.
pub fn cleanup_stale() -> Vec<String> {
    let mut removed = Vec::new();
    for line in ip_output(&["netns", "list"]).lines() {
        let ns = line.split_whitespace().next().unwrap_or_default();
        if ns.starts_with(PREFIX) {
            kill_pids_in(ns);
            if ip(&["netns", "del", ns]).is_ok() {
                removed.push(format!("netns {ns}"));
            }
        }
    }
    for line in ip_output(&["-o", "link", "show"]).lines() {
        // "12: lhcab12br: <...>" or "13: lhcab12n0@if2: <...>"
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or_default();
        if name.starts_with(PREFIX) && ip(&["link", "del", name]).is_ok() {
            removed.push(format!("link {name}"));
        }
    }
    removed
}

/// True when nothing named `lhc*` is left (namespaces or links).
pub fn nothing_left() -> bool {
    let ns = ip_output(&["netns", "list"]);
    let links = ip_output(&["-o", "link", "show"]);
    !ns.lines().any(|l| l.starts_with(PREFIX))
        && !links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .any(|n| n.starts_with(PREFIX))
}

/// One host: a namespace with `eth0` on the bridge and one address.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub ns: String,
    pub addr: String,
    /// Root-side end of the veth pair.
    veth: String,
}

impl Host {
    /// `ip netns exec NS program`: a command that runs inside this host.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    fn ip_in(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["netns", "exec", &self.ns, "ip"];
        full.extend_from_slice(args);
        ip(&full)
    }
}

/// The bridge and its hosts; removed on drop.
pub struct Topology {
    pub id: String,
    bridge: String,
    pub hosts: Vec<Host>,
}

impl Topology {
    /// Creates the bridge (`SUBNET.1/24`, so the root namespace reaches every host).
    pub fn new() -> Result<Topology> {
        let id = format!("{:04x}", rand::random::<u16>());
        let bridge = format!("{PREFIX}{id}br");
        let topo = Topology {
            id,
            bridge: bridge.clone(),
            hosts: Vec::new(),
        };
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{SUBNET}.1/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        Ok(topo)
    }

    /// Address of the root namespace on the bridge.
    pub fn root_addr(&self) -> String {
        format!("{SUBNET}.1")
    }

    /// Adds host `name` (at most 5 characters) with address `SUBNET.octet`.
    pub fn add_host(&mut self, name: &str, octet: u8) -> Result<Host> {
        assert!(name.len() <= 5 && (2..255).contains(&octet));
        let ns = format!("{PREFIX}{}-{name}", self.id);
        let veth = format!("{PREFIX}{}{name}", self.id);
        let host = Host {
            name: name.into(),
            ns: ns.clone(),
            addr: format!("{SUBNET}.{octet}"),
            veth: veth.clone(),
        };
        ip(&["netns", "add", &ns])?;
        // Recorded before the rest, so that drop removes a half-built host too.
        self.hosts.push(host.clone());
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["link", "set", &veth, "master", &self.bridge])?;
        ip(&["link", "set", &veth, "up"])?;
        host.ip_in(&["addr", "add", &format!("{}/24", host.addr), "dev", "eth0"])?;
        host.ip_in(&["link", "set", "eth0", "up"])?;
        host.ip_in(&["link", "set", "lo", "up"])?;
        Ok(host)
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// Drops every packet `from` sends to `to` (one direction). Idempotent.
    pub fn cut(&self, from: &str, to: &str) -> Result<()> {
        let (f, t) = (self.host(from), self.host(to));
        let dst = format!("{}/32", t.addr);
        let _ = f.ip_in(&["route", "del", "blackhole", &dst]);
        f.ip_in(&["route", "add", "blackhole", &dst])
    }

    /// Undoes [`cut`](Self::cut). Idempotent.
    pub fn uncut(&self, from: &str, to: &str) -> Result<()> {
        let (f, t) = (self.host(from), self.host(to));
        let dst = format!("{}/32", t.addr);
        match f.ip_in(&["route", "del", "blackhole", &dst]) {
            Err(e) if !e.to_string().contains("No such process") => Err(e),
            _ => Ok(()),
        }
    }

    /// Cuts both directions between `a` and `b`.
    pub fn partition(&self, a: &str, b: &str) -> Result<()> {
        self.cut(a, b)?;
        self.cut(b, a)
    }

    pub fn heal_partition(&self, a: &str, b: &str) -> Result<()> {
        self.uncut(a, b)?;
        self.uncut(b, a)
    }

    /// Takes the host's only link down: it reaches nobody and nobody reaches it.
    pub fn isolate(&self, name: &str) -> Result<()> {
        self.host(name).ip_in(&["link", "set", "eth0", "down"])
    }

    /// Brings the link up again; the address and its connected route come back with it.
    pub fn unisolate(&self, name: &str) -> Result<()> {
        let h = self.host(name);
        h.ip_in(&["link", "set", "eth0", "up"])?;
        // Blackhole routes survive a link flap; the connected route is restored by up.
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for h in &self.hosts {
            kill_pids_in(&h.ns);
            let _ = ip(&["netns", "del", &h.ns]);
            let _ = ip(&["link", "del", &h.veth]); // gone with the namespace, usually
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// Network namespaces, veth pairs and routes need root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
