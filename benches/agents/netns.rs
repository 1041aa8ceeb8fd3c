//! Hosts in network namespaces behind a bridge, for running real agents each with
//! its own IP and MAC (the approach of `tests/gateway_netns.rs`). Needs root and
//! iproute2; `Drop` removes everything made. The bridge has no uplink and an
//! `unreachable` route covers its /24 until teardown, so no packet for that range
//! takes the default route.

#[path = "../../tests/common/ip.rs"]
mod ip;
use ip::ip;

/// Hosts one bridge takes, at most (addresses .11 to .250 of its /24).
pub const MAX_HOSTS: usize = 240;

/// A namespaced host: `eth0` in namespace `ns`, its peer `veth` on the bridge.
pub struct Host {
    pub ns: String,
    veth: String,
    pub ip: String,
}

pub struct Net {
    bridge: String,
    subnet: Option<String>,
    pub bridge_ip: String,
    pub hosts: Vec<Host>,
}

impl Net {
    /// A bridge and `hosts` namespaces on it, or why they cannot be made here.
    pub fn setup(hosts: usize) -> Result<Net, String> {
        if hosts == 0 || hosts > MAX_HOSTS {
            return Err(format!(
                "{hosts} hosts asked for; between 1 and MAX_HOSTS = {MAX_HOSTS}"
            ));
        }
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        ip(&["-V"])?;
        let pid = std::process::id();
        let mut net = Net {
            bridge: format!("ab{pid}br"),
            subnet: None,
            bridge_ip: String::new(),
            hosts: (1..=hosts)
                .map(|i| Host {
                    ns: format!("ab{pid}-h{i}"),
                    veth: format!("ab{pid}v{i}"),
                    ip: String::new(),
                })
                .collect(),
        };
        net.remove_all();
        // From here on, returning drops `net`, which removes what was made.
        net.build()?;
        Ok(net)
    }

    fn build(&mut self) -> Result<(), String> {
        for h in &self.hosts {
            ip(&["netns", "add", &h.ns])?;
        }
        ip(&["netns", "exec", &self.hosts[0].ns, "true"])?;
        let n = self.claim_subnet()?;
        self.bridge_ip = format!("10.214.{n}.1");
        let bridge_cidr = format!("{}/24", self.bridge_ip);
        ip(&["link", "add", &self.bridge, "type", "bridge"])?;
        ip(&["addr", "add", &bridge_cidr, "dev", &self.bridge])?;
        ip(&["link", "set", &self.bridge, "up"])?;
        for (i, h) in (1usize..).zip(self.hosts.iter_mut()) {
            h.ip = format!("10.214.{n}.{}", 10 + i);
            let mac = format!("02:a8:{n:02x}:00:{:02x}:{:02x}", i / 256, i % 256);
            let host_cidr = format!("{}/24", h.ip);
            ip(&[
                "link", "add", &h.veth, "type", "veth", "peer", "name", "eth0", "address", &mac,
                "netns", &h.ns,
            ])?;
            ip(&["link", "set", &h.veth, "master", &self.bridge])?;
            ip(&["link", "set", &h.veth, "up"])?;
            ip(&["-n", &h.ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &h.ns, "addr", "add", &host_cidr, "dev", "eth0"])?;
            ip(&["-n", &h.ns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// Picks N for `10.214.N.0/24` with no route of this machine in it, and claims
    /// it with an `unreachable` route.
    fn claim_subnet(&mut self) -> Result<u32, String> {
        let start = std::process::id() % 254;
        for k in 0..254 {
            let n = (start + k) % 254 + 1;
            let cidr = format!("10.214.{n}.0/24");
            let used = ip(&["-4", "route", "show", "table", "all", "root", &cidr])?;
            if !used.trim().is_empty() {
                continue;
            }
            match ip(&["route", "add", "unreachable", &cidr, "metric", "4000"]) {
                Ok(_) => {
                    self.subnet = Some(cidr);
                    return Ok(n);
                }
                Err(e) if e.contains("File exists") => {}
                Err(e) => return Err(e),
            }
        }
        Err("no free range 10.214.N.0/24 for the bridge".into())
    }

    /// The range the gateway scans.
    pub fn range(&self) -> String {
        match self.bridge_ip.rsplit_once('.') {
            Some((prefix, _)) => format!("{prefix}.0/24"),
            None => String::new(),
        }
    }

    fn remove_all(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["link", "del", &h.veth]);
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
        if let Some(cidr) = self.subnet.take() {
            if let Err(e) = ip(&["route", "del", "unreachable", &cidr, "metric", "4000"]) {
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
