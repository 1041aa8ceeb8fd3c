//! Who this agent is, as ID reports it: host name and the MAC address of the
//! interface a request arrived on (so agents in different hosts or network
//! namespaces report their own addresses).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

const NO_MAC: &str = "00:00:00:00:00:00";

#[derive(Default)]
pub struct Identity {
    macs: Mutex<HashMap<IpAddr, String>>,
}

impl Identity {
    pub fn hostname() -> String {
        hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into())
    }

    /// The MAC of the interface holding `ip`; for loopback (no MAC of its own), the
    /// host's first real interface.
    pub fn mac_for(&self, ip: IpAddr) -> String {
        let mut cache = self.macs.lock().unwrap_or_else(|p| p.into_inner());
        cache.entry(ip).or_insert_with(|| lookup_mac(ip)).clone()
    }
}

fn lookup_mac(ip: IpAddr) -> String {
    let by_interface = if_addrs::get_if_addrs()
        .ok()
        .and_then(|ifs| ifs.into_iter().find(|i| i.ip() == ip))
        .and_then(|i| mac_address::mac_address_by_name(&i.name).ok().flatten())
        .map(|m| m.to_string().to_lowercase())
        .filter(|m| m != NO_MAC);
    by_interface
        .or_else(|| {
            mac_address::get_mac_address()
                .ok()
                .flatten()
                .map(|m| m.to_string().to_lowercase())
        })
        .unwrap_or_else(|| NO_MAC.to_string())
}
