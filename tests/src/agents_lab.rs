//! The 3-node agents lab, as sluice is deployed: the namespace lab's three backends are the
//! cluster's nodes, a real kube-apiserver listens on the lb namespace's segment address (the
//! nodes reach it there), it knows the three Nodes and the `web` LoadBalancer Service (its
//! ingress set to the lab's VIP), and each node runs `sluice agent` with the agent's own
//! ServiceAccount. The colocation, health and BGP tests build on it ([`AgentsLab`]); what they
//! add (a router, load files, their checks) stays with them.
//!
//! Dropping it stops the API server, then removes the namespaces: hold the agents in a field
//! declared before it, so that they stop first.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::kube::Kube;
use crate::lab::{HTTP_PORT, Lab, LabConfig, SluiceProcess, require_root, sluice_binary};
use crate::servers::{ECHO_PORT, UDP_PORT};

/// The lab's nodes (the namespace lab's backends).
pub const NODES: usize = 3;

/// Where each node's agent answers `/readyz` and `/metrics` (on its namespace's loopback).
const HEALTH_ADDR: &str = "127.0.0.1:9941";
const METRICS_ADDR: &str = "127.0.0.1:9477";

/// Node `i`'s name in the API (and the agent's `--node-name`).
pub fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// The `web` LoadBalancer Service (externalTrafficPolicy Cluster, selector `app: web`, port
/// `http` = [`HTTP_PORT`]/TCP) as a test wants it.
#[derive(Clone, Copy, Debug, Default)]
pub struct WebService<'a> {
    /// `metadata.annotations`, (key, value).
    pub annotations: &'a [(&'a str, &'a str)],
    /// Also a port `echo` = [`ECHO_PORT`]/TCP.
    pub echo: bool,
    /// Also the Service `who`, port [`UDP_PORT`]/UDP (the backends' "who are you" server) on
    /// the same VIP: one LoadBalancer Service may not mix protocols (this API server's rule).
    pub udp: bool,
}

impl WebService<'_> {
    fn yaml(&self) -> String {
        let mut annotations = String::new();
        if !self.annotations.is_empty() {
            let pairs: Vec<String> = self
                .annotations
                .iter()
                .map(|(k, v)| format!("{k}: {}", json!(v)))
                .collect();
            annotations = format!("  annotations: {{{}}}\n", pairs.join(", "));
        }
        let echo = if self.echo {
            format!("    - {{name: echo, port: {ECHO_PORT}, protocol: TCP}}\n")
        } else {
            String::new()
        };
        format!(
            "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
{annotations}spec:
  type: LoadBalancer
  externalTrafficPolicy: Cluster
  selector: {{app: web}}
  ports:
    - {{name: http, port: {HTTP_PORT}, protocol: TCP}}
{echo}"
        )
    }

    /// The `who` Service (see [`WebService::udp`]).
    fn who_yaml() -> String {
        format!(
            "apiVersion: v1
kind: Service
metadata:
  name: who
  namespace: default
spec:
  type: LoadBalancer
  externalTrafficPolicy: Cluster
  selector: {{app: web}}
  ports:
    - {{name: who, port: {UDP_PORT}, protocol: UDP}}
"
        )
    }
}

/// The namespace lab and the API server, with the Nodes and the `web` Service in it.
pub struct AgentsLab {
    /// Dropped before the lab: the API server listens in the lab's lb namespace.
    pub kube: Kube,
    pub lab: Lab,
    /// The agents' kubeconfig (their ServiceAccount's token).
    kubeconfig: PathBuf,
}

impl AgentsLab {
    /// Builds the lab (three nodes, no UDP servers), starts the API server in the lb namespace,
    /// registers the three Nodes (ready) and creates `web` with the lab's VIP as its ingress.
    pub fn start(web: WebService<'_>) -> Result<AgentsLab> {
        require_root();
        let lab = Lab::build(LabConfig {
            backends: NODES,
            udp: false,
        })?;
        // The API server listens on the lb namespace's segment address: the nodes reach it there.
        let kube = Kube::start_listening(lab.lb_ns(), lab.lb_addr())?;
        let kubeconfig = kube.agent_kubeconfig()?;
        for i in 0..NODES {
            kube.node(&node_name(i), lab.backend_addr(i), true)?;
        }
        let ingress =
            json!({"status": {"loadBalancer": {"ingress": [{"ip": lab.vip().to_string()}]}}});
        kube.apply_yaml(&web.yaml())?;
        kube.patch_status("/api/v1/namespaces/default/services/web", &ingress)?;
        if web.udp {
            kube.apply_yaml(&WebService::who_yaml())?;
            kube.patch_status("/api/v1/namespaces/default/services/who", &ingress)?;
        }
        Ok(AgentsLab {
            kube,
            lab,
            kubeconfig,
        })
    }

    /// Node `i`'s bpffs pin directory.
    pub fn pin_dir(&self, i: usize) -> PathBuf {
        self.lab.pin_dir().join(format!("node{i}"))
    }

    /// Starts `sluice agent` on node `i` (its namespace, `eth0`, its own pin directory, health
    /// on 127.0.0.1:9941, metrics on 127.0.0.1:9477) with `extra` arguments after those.
    pub fn spawn_agent(&self, i: usize, extra: &[&str]) -> Result<SluiceProcess> {
        self.spawn_agent_on(i, "eth0", extra)
    }

    /// As [`AgentsLab::spawn_agent`] with `--iface IFACE` (a name or `auto`).
    pub fn spawn_agent_on(&self, i: usize, iface: &str, extra: &[&str]) -> Result<SluiceProcess> {
        let kubeconfig = self.kubeconfig.to_string_lossy().into_owned();
        let name = node_name(i);
        let mut args = vec![
            "agent",
            "--iface",
            iface,
            "--kubeconfig",
            &kubeconfig,
            "--node-name",
            &name,
            "--health-addr",
            HEALTH_ADDR,
            "--metrics-addr",
            METRICS_ADDR,
        ];
        args.extend_from_slice(extra);
        self.lab
            .spawn_sluice_in(self.lab.backend_ns(i), &self.pin_dir(i), &args)
    }

    /// Node `i`'s agent's `/readyz` body, whatever its status.
    pub fn agent_readyz(&self, i: usize) -> Result<String> {
        let url = format!("http://{HEALTH_ADDR}/readyz");
        let out = self.lab.exec_ok(
            self.lab.backend_ns(i),
            &["curl", "-sS", "--max-time", "10", &url],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Node `i`'s agent's `/metrics` (scraped in its namespace): `name{labels}` -> value.
    pub fn agent_metrics(&self, i: usize) -> Result<BTreeMap<String, f64>> {
        self.lab.metrics_in(self.lab.backend_ns(i), METRICS_ADDR)
    }

    /// Runs `sluice --pin-dir <node i's> <args> --iface eth0 -o json` in node `i`'s namespace
    /// and returns its JSON.
    pub fn sluice(&self, i: usize, args: &[&str]) -> Result<Value> {
        let bin = sluice_binary()?;
        let pins = self.pin_dir(i);
        let mut argv = vec![
            bin.to_string_lossy().into_owned(),
            "--pin-dir".into(),
            pins.to_string_lossy().into_owned(),
        ];
        argv.extend(args.iter().map(|s| (*s).to_owned()));
        argv.extend(["--iface".into(), "eth0".into(), "-o".into(), "json".into()]);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = self.lab.exec_ok(self.lab.backend_ns(i), &argv)?;
        serde_json::from_slice(&out.stdout).context("sluice -o json: not JSON")
    }
}

/// Fails with its log if an agent has exited; `None` is a node whose agent was stopped on
/// purpose. The index is the node's.
pub fn check_agents<'a>(
    agents: impl IntoIterator<Item = Option<&'a mut SluiceProcess>>,
) -> Result<()> {
    for (i, a) in agents.into_iter().enumerate() {
        if let Some(a) = a
            && let Some(status) = a.try_wait()?
        {
            bail!("agent on node {i} exited ({status}): {}", a.log_text());
        }
    }
    Ok(())
}
