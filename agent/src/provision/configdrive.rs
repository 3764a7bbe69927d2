//! The configdrive's content from the operator's inputs: a typed model
//! (TOML, or JSON starting with `{`) compiled to OpenStack's
//! `meta_data.json`, `network_data.json` and a multipart MIME `user_data`,
//! checked against cloud-init's rules before anything is written (its
//! ConfigDrive reader refuses a `meta_data.json` without `uuid`). Pure.
//!
//! ```toml
//! uuid = "4bd5c5a1-0f4e-4a4b-9d6c-3f0b9c1e0a11"
//! hostname = "node-01"
//! public_keys = { default = "ssh-ed25519 AAAA... ops" }
//! [[link]]
//! id = "eth0"
//! mac = "52:54:00:12:34:56"
//! [[network]]
//! link = "eth0"
//! address = "10.0.2.15/24"     # or dhcp = true
//! gateway = "10.0.2.2"
//! dns = ["10.0.2.3"]
//! [[user_data]]
//! type = "text/cloud-config"
//! content = "#cloud-config\nlocale: false\n"
//! ```

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// The versions of the OpenStack metadata layout written (cloud-init
/// reads the newest it knows, else `latest`).
pub const VERSIONS: [&str; 2] = ["latest", "2012-08-10"];

/// Where the new root's preserve fragment for cloud-init goes (below the
/// root; `/etc/imageupd/` is itself preserved, so it outlives updates).
pub const PRESERVE_FRAGMENT: &str = "etc/imageupd/config.d/10-provision-cloud-init.toml";

/// What cloud-init makes of the configdrive on the first boot, node-local
/// from then on: its state (`/var/lib/cloud/`: the instance id and the
/// per-instance semaphores; without them the next boot is a new instance
/// and per-instance modules run again: runcmd, SSH host keys regenerated),
/// the network configuration it rendered from `network_data.json`, and the
/// users it created (the default user carries the configdrive's SSH keys;
/// `/home/` is preserved already). The account databases are then the
/// node's: a later image's new system users must come from
/// systemd-sysusers or a post-apply hook (docs/provision.md).
pub const CLOUD_INIT_PRESERVE: &[&str] = &[
    "/var/lib/cloud/",
    "/etc/network/interfaces.d/50-cloud-init",
    "/etc/udev/rules.d/70-persistent-net.rules",
    "/etc/sudoers.d/90-cloud-init-users",
    "/etc/passwd",
    "/etc/passwd-",
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/group",
    "/etc/group-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/subuid",
    "/etc/subuid-",
    "/etc/subgid",
    "/etc/subgid-",
];

/// The preserve fragment's text (TOML, `preserve_extra`).
pub fn preserve_fragment() -> String {
    let mut s = String::from(
        "# Written by `imageupd provision` with a configdrive: what cloud-init\n\
         # made of it on the first boot survives updates in place, so a later\n\
         # boot is the same instance (per-instance modules do not run again).\n\
         preserve_extra = [\n",
    );
    for p in CLOUD_INIT_PRESERVE {
        s.push_str(&format!("    \"{p}\",\n"));
    }
    s.push_str("]\n");
    s
}

/// Why configdrive inputs were refused.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// Not parseable.
    #[error("configdrive inputs: {0}")]
    Parse(String),
    /// Against cloud-init's rules or inconsistent.
    #[error("configdrive inputs: {0}")]
    Invalid(String),
}

/// The operator's inputs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inputs {
    /// Instance UUID (cloud-init's instance-id). Required.
    #[serde(default)]
    pub uuid: Option<String>,
    /// Host name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// SSH public keys by name.
    #[serde(default)]
    pub public_keys: BTreeMap<String, String>,
    /// Network links (NICs).
    #[serde(default, rename = "link")]
    pub links: Vec<Link>,
    /// Networks on the links.
    #[serde(default, rename = "network")]
    pub networks: Vec<Network>,
    /// user_data parts, joined as multipart MIME.
    #[serde(default)]
    pub user_data: Vec<Part>,
}

/// A NIC.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Name referenced by networks.
    pub id: String,
    /// MAC address.
    pub mac: String,
    /// MTU in bytes.
    #[serde(default)]
    pub mtu: Option<u32>,
}

/// An IPv4 network on a link: static (`address`) or `dhcp`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// The link's id.
    pub link: String,
    /// `A.B.C.D/PREFIX` for a static address.
    #[serde(default)]
    pub address: Option<String>,
    /// DHCP instead of a static address.
    #[serde(default)]
    pub dhcp: bool,
    /// Default gateway.
    #[serde(default)]
    pub gateway: Option<String>,
    /// DNS servers.
    #[serde(default)]
    pub dns: Vec<String>,
}

/// A user_data part.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    /// MIME type: text/cloud-config, text/x-shellscript, text/cloud-boothook.
    #[serde(rename = "type")]
    pub kind: String,
    /// The part's text.
    pub content: String,
}

/// Parse the inputs: JSON when they start with `{`, else TOML.
pub fn parse(text: &str) -> Result<Inputs, DriveError> {
    if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| DriveError::Parse(e.to_string()))
    } else {
        toml::from_str(text).map_err(|e| DriveError::Parse(e.to_string()))
    }
}

/// A configdrive's files: each path inside the drive and its content.
pub type Files = Vec<(String, Vec<u8>)>;

/// The files of the drive (path below the drive's top, bytes), checked.
pub fn build(i: &Inputs) -> Result<Files, DriveError> {
    let meta = meta_data(i)?;
    let net = network_data(i)?;
    let user = user_data(&i.user_data)?;
    let mut files = Vec::new();
    for v in VERSIONS {
        let dir = format!("openstack/{v}");
        files.push((format!("{dir}/meta_data.json"), to_json(&meta)));
        files.push((format!("{dir}/network_data.json"), to_json(&net)));
        if let Some(u) = &user {
            files.push((format!("{dir}/user_data"), u.clone()));
        }
    }
    Ok(files)
}

fn to_json(v: &Value) -> Vec<u8> {
    let mut b = serde_json::to_vec_pretty(v).unwrap_or_default();
    b.push(b'\n');
    b
}

fn invalid(s: String) -> DriveError {
    DriveError::Invalid(s)
}

/// `meta_data.json`: uuid (required), hostname, public_keys.
pub fn meta_data(i: &Inputs) -> Result<Value, DriveError> {
    let uuid = i
        .uuid
        .as_deref()
        .filter(|u| !u.trim().is_empty())
        .ok_or_else(|| {
            invalid("meta_data.json needs a uuid (cloud-init's instance-id; its ConfigDrive reader refuses a drive without one)".into())
        })?;
    if !uuid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(invalid(format!(
            "uuid {uuid:?}: only letters, digits and -"
        )));
    }
    let mut m = json!({ "uuid": uuid });
    if let Some(h) = &i.hostname {
        check_hostname(h)?;
        m["hostname"] = json!(h);
        m["name"] = json!(h.split('.').next().unwrap_or(h));
    }
    if !i.public_keys.is_empty() {
        for (k, v) in &i.public_keys {
            if v.contains('\n') || !v.starts_with("ssh-") && !v.starts_with("ecdsa-") {
                return Err(invalid(format!(
                    "public key {k:?} is not one OpenSSH public key line"
                )));
            }
        }
        m["public_keys"] = json!(i.public_keys);
    }
    Ok(m)
}

/// RFC 1123 host name.
fn check_hostname(h: &str) -> Result<(), DriveError> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "hostname {h:?} is not an RFC 1123 host name"
        )))
    }
}

/// `network_data.json` in OpenStack's format, as cloud-init's
/// `convert_net_json` reads it: links of type phy, ipv4 or ipv4_dhcp
/// networks, a default route, DNS services.
pub fn network_data(i: &Inputs) -> Result<Value, DriveError> {
    let mut links = Vec::new();
    for l in &i.links {
        if links.iter().any(|x: &Value| x["id"] == json!(l.id)) {
            return Err(invalid(format!("link {:?} is given twice", l.id)));
        }
        check_mac(&l.mac)?;
        let mut v =
            json!({"id": l.id, "type": "phy", "ethernet_mac_address": l.mac.to_lowercase()});
        if let Some(m) = l.mtu {
            v["mtu"] = json!(m);
        }
        links.push(v);
    }
    let mut networks = Vec::new();
    let mut services = Vec::new();
    for (n, net) in i.networks.iter().enumerate() {
        if !i.links.iter().any(|l| l.id == net.link) {
            return Err(invalid(format!(
                "network {n} names link {:?}, which is not given",
                net.link
            )));
        }
        let mut v = json!({"id": format!("network{n}"), "link": net.link, "network_id": format!("network{n}")});
        match (&net.address, net.dhcp) {
            (Some(a), false) => {
                let (ip, prefix) = parse_cidr(a)?;
                v["type"] = json!("ipv4");
                v["ip_address"] = json!(ip.to_string());
                v["netmask"] = json!(netmask(prefix).to_string());
                if let Some(g) = &net.gateway {
                    let gw: Ipv4Addr = g
                        .parse()
                        .map_err(|_| invalid(format!("gateway {g:?} is not an IPv4 address")))?;
                    if u32::from(gw) & u32::from(netmask(prefix))
                        != u32::from(ip) & u32::from(netmask(prefix))
                    {
                        return Err(invalid(format!("gateway {gw} is outside {a}")));
                    }
                    v["routes"] = json!([{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": gw.to_string()}]);
                }
            }
            (None, true) => v["type"] = json!("ipv4_dhcp"),
            _ => {
                return Err(invalid(format!(
                    "network {n}: give either address or dhcp = true"
                )))
            }
        }
        let mut dns = Vec::new();
        for d in &net.dns {
            let a: Ipv4Addr = d
                .parse()
                .map_err(|_| invalid(format!("dns {d:?} is not an IPv4 address")))?;
            dns.push(json!({"type": "dns", "address": a.to_string()}));
        }
        if !dns.is_empty() {
            v["services"] = json!(dns.clone());
            services.extend(dns);
        }
        networks.push(v);
    }
    Ok(json!({"links": links, "networks": networks, "services": services}))
}

fn check_mac(m: &str) -> Result<(), DriveError> {
    let parts: Vec<&str> = m.split(':').collect();
    if parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
    {
        Ok(())
    } else {
        Err(invalid(format!("mac {m:?} is not a MAC address")))
    }
}

fn parse_cidr(a: &str) -> Result<(Ipv4Addr, u8), DriveError> {
    let bad = || invalid(format!("address {a:?} is not A.B.C.D/PREFIX"));
    let (ip, p) = a.split_once('/').ok_or_else(bad)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let p: u8 = p.parse().map_err(|_| bad())?;
    if !(1..=32).contains(&p) {
        return Err(bad());
    }
    Ok((ip, p))
}

fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

/// user_data: the parts as one multipart/mixed MIME message (none when no
/// part), each checked the way cloud-init dispatches it.
pub fn user_data(parts: &[Part]) -> Result<Option<Vec<u8>>, DriveError> {
    if parts.is_empty() {
        return Ok(None);
    }
    for (n, p) in parts.iter().enumerate() {
        let ok = match p.kind.as_str() {
            "text/cloud-config" => p.content.starts_with("#cloud-config"),
            "text/x-shellscript" | "text/cloud-boothook" => p.content.starts_with("#!") || p.kind == "text/cloud-boothook",
            other => return Err(invalid(format!("user_data part {n}: type {other:?} is not one of text/cloud-config, text/x-shellscript, text/cloud-boothook"))),
        };
        if !ok {
            return Err(invalid(format!(
                "user_data part {n} ({}): must start with {}",
                p.kind,
                if p.kind == "text/cloud-config" {
                    "#cloud-config"
                } else {
                    "#!"
                }
            )));
        }
        if !p.content.is_ascii() {
            return Err(invalid(format!(
                "user_data part {n}: only ASCII text (sent 7bit)"
            )));
        }
    }
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.content.as_bytes());
    }
    let boundary = format!("==imageupd-{}==", &hex::encode(h.finalize())[..24]);
    if parts.iter().any(|p| p.content.contains(&boundary)) {
        return Err(invalid("user_data contains its own MIME boundary".into()));
    }
    let mut m =
        format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n");
    for (n, p) in parts.iter().enumerate() {
        m.push_str(&format!(
            "--{boundary}\nContent-Type: {}; charset=\"us-ascii\"\nMIME-Version: 1.0\nContent-Transfer-Encoding: 7bit\nContent-Disposition: attachment; filename=\"part-{:03}\"\n\n{}",
            p.kind,
            n + 1,
            p.content
        ));
        if !p.content.ends_with('\n') {
            m.push('\n');
        }
    }
    m.push_str(&format!("--{boundary}--\n"));
    Ok(Some(m.into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r##"
uuid = "4bd5c5a1-0f4e-4a4b-9d6c-3f0b9c1e0a11"
hostname = "node-01"
[[link]]
id = "eth0"
mac = "52:54:00:12:34:56"
[[network]]
link = "eth0"
address = "10.0.2.15/24"
gateway = "10.0.2.2"
dns = ["10.0.2.3"]
[[user_data]]
type = "text/cloud-config"
content = "#cloud-config\nlocale: false\n"
[[user_data]]
type = "text/x-shellscript"
content = "#!/bin/sh\necho hi\n"
"##;

    #[test]
    fn builds_both_versions() {
        let files = build(&parse(GOOD).unwrap()).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "openstack/latest/meta_data.json",
                "openstack/latest/network_data.json",
                "openstack/latest/user_data",
                "openstack/2012-08-10/meta_data.json",
                "openstack/2012-08-10/network_data.json",
                "openstack/2012-08-10/user_data",
            ]
        );
        let meta: Value = serde_json::from_slice(&files[0].1).unwrap();
        assert_eq!(meta["uuid"], "4bd5c5a1-0f4e-4a4b-9d6c-3f0b9c1e0a11");
        assert_eq!(meta["hostname"], "node-01");
        let net: Value = serde_json::from_slice(&files[1].1).unwrap();
        assert_eq!(net["networks"][0]["netmask"], "255.255.255.0");
        assert_eq!(net["networks"][0]["routes"][0]["gateway"], "10.0.2.2");
        assert_eq!(net["links"][0]["ethernet_mac_address"], "52:54:00:12:34:56");
        let user = String::from_utf8(files[2].1.clone()).unwrap();
        assert!(user.starts_with("Content-Type: multipart/mixed; boundary=\"==imageupd-"));
        assert_eq!(user.matches("Content-Type: text/").count(), 2);
        assert!(user.trim_end().ends_with("--"));
    }

    #[test]
    fn refusals() {
        let no_uuid = GOOD.replace("uuid = \"4bd5c5a1-0f4e-4a4b-9d6c-3f0b9c1e0a11\"\n", "");
        let e = build(&parse(&no_uuid).unwrap()).unwrap_err();
        assert!(e.to_string().contains("needs a uuid"), "{e}");
        for (from, to, what) in [
            ("node-01", "node_01", "RFC 1123"),
            ("52:54:00:12:34:56", "52:54:00:12:34", "not a MAC"),
            ("10.0.2.15/24", "10.0.2.15", "A.B.C.D/PREFIX"),
            ("10.0.2.2", "10.0.3.2", "outside"),
            ("link = \"eth0\"", "link = \"eth1\"", "not given"),
            ("#cloud-config\\n", "locale\\n", "must start with"),
            ("text/x-shellscript", "text/html", "is not one of"),
        ] {
            let t = GOOD.replacen(from, to, 1);
            assert_ne!(t, GOOD, "{from}");
            let e = parse(&t).and_then(|i| build(&i)).unwrap_err();
            assert!(e.to_string().contains(what), "{from} -> {to}: {e}");
        }
        assert!(parse("uuid = 3").is_err());
        assert!(parse("colour = \"x\"")
            .unwrap_err()
            .to_string()
            .contains("unknown field"));
    }

    #[test]
    fn preserve_fragment_parses() {
        let v: toml::Table = toml::from_str(&preserve_fragment()).unwrap();
        let list = v["preserve_extra"].as_array().unwrap();
        assert_eq!(list.len(), CLOUD_INIT_PRESERVE.len());
        assert_eq!(list[0].as_str(), Some("/var/lib/cloud/"));
    }

    #[test]
    fn dhcp_network() {
        let t = "uuid = \"u\"\n[[link]]\nid = \"e\"\nmac = \"02:00:00:00:00:01\"\n[[network]]\nlink = \"e\"\ndhcp = true\n";
        let net = network_data(&parse(t).unwrap()).unwrap();
        assert_eq!(net["networks"][0]["type"], "ipv4_dhcp");
        assert_eq!(user_data(&[]).unwrap(), None);
    }
}
