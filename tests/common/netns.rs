//! Hosts in network namespaces behind a bridge, each with its own IP and MAC, for
//! running real agents as if on separate machines: `tests/gateway_netns.rs` and the
//! many-agents bench (`benches/agents`, which includes this file by path). Needs
//! root and iproute2; `Drop` removes everything made, also when a test panics.
//!
//! Traffic goes only to addresses of the namespaces made here: the bridge has no
//! uplink, and until teardown an `unreachable` route covers its /24, so no packet
//! for that range takes the default route even when the bridge is gone.

use super::ip::ip;

/// Hosts one bridge takes, at most (addresses .11 to .250 of its /24).
pub const MAX_HOSTS: usize = 240;
/// Linux's limit on an interface name's length.
const MAX_IFNAME: usize = 15;
/// The metric of the `unreachable` route that claims a bridge's range.
const CLAIM_METRIC: &str = "4000";

/// A namespaced host: `eth0` in namespace `ns`, its peer `veth` on the bridge.
pub struct Host {
    pub ns: String,
    pub veth: String,
    pub ip: String,
    pub mac: String,
}

/// A bridge `10.OCTET.N.1/24` in the root namespace and hosts on it.
pub struct Net {
    bridge: String,
    /// `10.OCTET.N.0/24`, once claimed with its `unreachable` route.
    subnet: Option<String>,
    pub bridge_ip: String,
    pub hosts: Vec<Host>,
}

/// Why the network could not be made.
#[derive(Debug)]
pub struct SetupError {
    pub reason: String,
    /// The kernel refused network namespaces themselves (not a missing tool or a
    /// broken step), so even CI skips.
    pub kernel_forbids: bool,
}

impl SetupError {
    fn step(reason: String) -> SetupError {
        SetupError {
            reason,
            kernel_forbids: false,
        }
    }

    /// A failure to make or enter a namespace: the kernel forbidding it says so.
    fn namespace(reason: String) -> SetupError {
        let forbids = [
            "Operation not permitted",
            "Permission denied",
            "Invalid argument",
            "not supported",
            "Function not implemented",
        ]
        .iter()
        .any(|s| reason.contains(s));
        SetupError {
            reason,
            kernel_forbids: forbids,
        }
    }
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl Net {
    /// A bridge in `10.OCTET.N.0/24` (N free on this machine) and `hosts`
    /// namespaces on it. `prefix` names everything made (`{prefix}br`,
    /// `{prefix}-h{i}`, `{prefix}v{i}`) and must differ between the runs that may
    /// share the machine at once (a pid and a tag); it must leave room in an
    /// interface name for `v` and the host's number.
    pub fn setup(prefix: &str, octet: u8, hosts: usize) -> Result<Net, SetupError> {
        if hosts == 0 || hosts > MAX_HOSTS {
            return Err(SetupError::step(format!(
                "{hosts} hosts asked for; between 1 and MAX_HOSTS = {MAX_HOSTS}"
            )));
        }
        let longest = format!("{prefix}v{hosts}");
        if longest.len() > MAX_IFNAME {
            return Err(SetupError::step(format!(
                "interface name {longest:?} would be longer than {MAX_IFNAME} characters"
            )));
        }
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(SetupError::step("not running as root".into()));
        }
        ip(&["-V"]).map_err(SetupError::step)?;
        let mut net = Net {
            bridge: format!("{prefix}br"),
            subnet: None,
            bridge_ip: String::new(),
            hosts: (1..=hosts)
                .map(|i| Host {
                    ns: format!("{prefix}-h{i}"),
                    veth: format!("{prefix}v{i}"),
                    ip: String::new(),
                    mac: String::new(),
                })
                .collect(),
        };
        // Leftovers of an earlier process that had this pid and was killed.
        net.remove_all();
        // From here on, returning drops `net`, which removes what was made.
        net.build(octet)?;
        Ok(net)
    }

    /// The bridge's /24, the range a gateway scans to find the hosts.
    pub fn range(&self) -> String {
        match self.bridge_ip.rsplit_once('.') {
            Some((prefix, _)) => format!("{prefix}.0/24"),
            None => String::new(),
        }
    }

    /// The host-side end of host `i`'s link, up or down.
    pub fn set_link(&self, i: usize, up: bool) {
        let h = &self.hosts[i];
        let state = if up { "up" } else { "down" };
        if let Err(e) = ip(&["link", "set", &h.veth, state]) {
            panic!("setting {}'s link {state}: {e}", h.ns);
        }
    }

    fn build(&mut self, octet: u8) -> Result<(), SetupError> {
        // Namespaces first: the step a kernel or a sandbox may refuse.
        for h in &self.hosts {
            ip(&["netns", "add", &h.ns]).map_err(SetupError::namespace)?;
        }
        ip(&["netns", "exec", &self.hosts[0].ns, "true"]).map_err(SetupError::namespace)?;

        let n = self.claim_subnet(octet)?;
        self.bridge_ip = format!("10.{octet}.{n}.1");
        for (i, h) in (1usize..).zip(self.hosts.iter_mut()) {
            h.ip = format!("10.{octet}.{n}.{}", 10 + i);
            // Locally administered, and unique per range and host.
            h.mac = format!("02:{octet:02x}:{n:02x}:00:00:{i:02x}");
        }
        let step = |args: &[&str]| ip(args).map(drop).map_err(SetupError::step);
        let bridge_cidr = format!("{}/24", self.bridge_ip);
        step(&["link", "add", &self.bridge, "type", "bridge"])?;
        step(&["addr", "add", &bridge_cidr, "dev", &self.bridge])?;
        step(&["link", "set", &self.bridge, "up"])?;
        for h in &self.hosts {
            let host_cidr = format!("{}/24", h.ip);
            step(&[
                "link", "add", &h.veth, "type", "veth", "peer", "name", "eth0", "address", &h.mac,
                "netns", &h.ns,
            ])?;
            step(&["link", "set", &h.veth, "master", &self.bridge])?;
            step(&["link", "set", &h.veth, "up"])?;
            step(&["-n", &h.ns, "link", "set", "lo", "up"])?;
            step(&["-n", &h.ns, "addr", "add", &host_cidr, "dev", "eth0"])?;
            step(&["-n", &h.ns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// Picks N for `10.OCTET.N.0/24`, starting from one derived from the pid, such
    /// that no route of this machine lies in that range, and claims it by adding an
    /// `unreachable` route for it (which a concurrent claimant's add would find).
    fn claim_subnet(&mut self, octet: u8) -> Result<u32, SetupError> {
        let start = std::process::id() % 254;
        for k in 0..254 {
            let n = (start + k) % 254 + 1;
            let cidr = format!("10.{octet}.{n}.0/24");
            let used = ip(&["-4", "route", "show", "table", "all", "root", &cidr])
                .map_err(SetupError::step)?;
            if !used.trim().is_empty() {
                continue;
            }
            match ip(&["route", "add", "unreachable", &cidr, "metric", CLAIM_METRIC]) {
                Ok(_) => {
                    self.subnet = Some(cidr);
                    return Ok(n);
                }
                // Claimed by a concurrent run since we looked.
                Err(e) if e.contains("File exists") => {}
                Err(e) => return Err(SetupError::step(e)),
            }
        }
        Err(SetupError::step(format!(
            "no free range 10.{octet}.N.0/24 for the bridge"
        )))
    }

    /// Removes whatever of the network exists; every step may find nothing.
    fn remove_all(&mut self) {
        for h in &self.hosts {
            // Deleting one end of a veth pair deletes both.
            let _ = ip(&["link", "del", &h.veth]);
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
        // Last: until the bridge is gone, the range must not take the default route.
        if let Some(cidr) = self.subnet.take() {
            if let Err(e) = ip(&["route", "del", "unreachable", &cidr, "metric", CLAIM_METRIC]) {
                eprintln!("teardown: {e}");
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.remove_all();
    }
}
