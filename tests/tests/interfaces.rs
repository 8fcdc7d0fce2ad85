//! Which interface each node's agent attaches to (issue 29): clusters mix interface names, so
//! the agent takes the Node's `sluice.io/iface` annotation over `--iface`, and with `--iface
//! auto` the interface that carries the Node's InternalIP, else the default route's; it says
//! which and why in its log and `/readyz`. Three agents of the agents lab against a real
//! kube-apiserver, one per rule, each checked where it attached (its pinned link) and what its
//! `/readyz` says. Needs root.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use sluice_tests::SluiceProcess;
use sluice_tests::agents_lab::{AgentsLab, WebService};

/// Waits until node `i`'s agent answers `/readyz` with "ready"; returns the body.
fn ready_body(lab: &AgentsLab, i: usize, agent: &mut SluiceProcess) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = agent.try_wait()? {
            bail!("node {i}'s agent exited ({status}): {}", agent.log_text());
        }
        if let Ok(body) = lab.agent_readyz(i)
            && body.starts_with("ready")
        {
            return Ok(body);
        }
        ensure!(
            Instant::now() < deadline,
            "node {i}'s agent not ready after 60 s: {}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn each_agent_attaches_where_its_node_says_and_says_why() -> Result<()> {
    let lab = AgentsLab::start(WebService::default())?;
    // node-1's Node names its interface: that wins over an --iface that does not exist there.
    lab.kube
        .kubectl_ok(&["annotate", "node", "node-1", "sluice.io/iface=eth0"])?;
    // node-2's InternalIP is on none of its interfaces: auto takes the default route's.
    lab.kube.node("node-2", "192.0.2.99".parse()?, true)?;
    let via = lab.lab.lb_addr().to_string();
    lab.lab.exec_ok(
        lab.lab.backend_ns(2),
        &["ip", "route", "add", "default", "via", &via],
    )?;
    let mut agents = vec![
        lab.spawn_agent_on(0, "auto", &[])?,
        lab.spawn_agent_on(1, "nosuch0", &[])?,
        lab.spawn_agent_on(2, "auto", &[])?,
    ];
    let node0 = lab.lab.backend_addr(0);
    let expected = [
        format!("interface eth0: --iface auto: it carries the node's InternalIP {node0}"),
        "interface eth0: the node's sluice.io/iface annotation".to_owned(),
        "interface eth0: --iface auto: no interface carries the node's InternalIP (192.0.2.99); the default route's interface".to_owned(),
    ];
    for (i, (agent, want)) in agents.iter_mut().zip(&expected).enumerate() {
        let body = ready_body(&lab, i, agent)?;
        ensure!(
            body.lines().any(|l| l == want),
            "node {i}'s /readyz does not say {want:?}:\n{body}"
        );
        ensure!(
            agent
                .log_text()
                .contains(&want.replacen("interface ", "attaching to ", 1)),
            "node {i}'s log does not say where it attached: {}",
            agent.log_text()
        );
        // Attached there: its pins are under the chosen interface's name.
        ensure!(
            lab.pin_dir(i).join("eth0").is_dir(),
            "node {i}: no pins under {}",
            lab.pin_dir(i).join("eth0").display()
        );
    }
    drop(agents);
    Ok(())
}

/// The agent's log once it has exited (it must, within 30 s).
fn exit_log(mut agent: SluiceProcess) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.try_wait()?.is_none() {
        ensure!(
            Instant::now() < deadline,
            "the agent runs without its interface: {}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(agent.log_text())
}

#[test]
fn no_interface_to_attach_to_is_an_error_that_says_what_to_set() -> Result<()> {
    let lab = AgentsLab::start(WebService::default())?;
    // An annotation naming an interface the node has not: refused by name, and by whom.
    lab.kube
        .kubectl_ok(&["annotate", "node", "node-0", "sluice.io/iface=bond7"])?;
    let log = exit_log(lab.spawn_agent_on(0, "auto", &[])?)?;
    ensure!(
        log.contains("interface \"bond7\" not found") && log.contains("sluice.io/iface"),
        "the error names neither the interface nor who chose it: {log}"
    );
    // auto, with the InternalIP on no interface and no default route (the lab's nodes have
    // none): the error says what to set.
    lab.kube.node("node-1", "192.0.2.98".parse()?, true)?;
    let log = exit_log(lab.spawn_agent_on(1, "auto", &[])?)?;
    ensure!(
        log.contains(
            "no interface carries the node's InternalIP (192.0.2.98) and there is no default route"
        ) && log.contains("set --iface"),
        "{log}"
    );
    Ok(())
}
